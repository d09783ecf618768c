"""Keyboard shortcuts of the Review tab, injected into the page head.

Alt+R / Alt+S / Alt+U save the review as Real / Spoof / Unsure, Alt+Enter saves the form. They only
act while the Review tab is visible, so a keystroke elsewhere never records a verdict.
"""

# KeyboardEvent.code, not .key: on macOS Alt+S types "ß".
SHORTCUTS = {"KeyR": "review-real", "KeyS": "review-spoof", "KeyU": "review-unsure", "Enter": "review-save"}

HEAD = """
<script>
(() => {
  const keys = %s;
  document.addEventListener("keydown", (e) => {
    if (!e.altKey || e.ctrlKey || e.metaKey) return;
    const id = keys[e.code];
    if (!id) return;
    const button = document.getElementById(id);
    if (!button || button.offsetParent === null) return;  // the Review tab is not showing
    e.preventDefault();
    button.click();
  });
})();
</script>
""" % (repr(SHORTCUTS).replace("'", '"'))

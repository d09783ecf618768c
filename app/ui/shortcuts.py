"""What the workbench adds to the page head: its styles, the Review tab's keyboard shortcuts, the
shortcut help, and zoom / pan on evidence images.

Alt+R / Alt+S / Alt+U save the review as Real / Spoof / Unsure, Alt+Enter saves the form. They act only
while the Review tab is visible and never while the analyst types in a text field (a note with an "S"
records no verdict). ``?`` (outside a text field) shows the list of shortcuts; Esc closes it.

Images in a ``tarfas-zoom`` component zoom with the mouse wheel around the pointer (up to 32x, drawn
pixelated, so the original pixels show), pan by dragging, and fit again on a double-click.
"""

import json

from .case_view import CSS

# KeyboardEvent.code, not .key: on macOS Alt+S types "ß".
SHORTCUTS = {"KeyR": "review-real", "KeyS": "review-spoof", "KeyU": "review-unsure", "Enter": "review-save"}
HELP = [
    ("Alt+R", "save the review as Real (Review tab)"),
    ("Alt+S", "save the review as Spoof (Review tab)"),
    ("Alt+U", "save the review as Unsure (Review tab)"),
    ("Alt+Enter", "save the review form (Review tab)"),
    ("?", "show or hide this help"),
    ("Esc", "close this help"),
    ("Mouse wheel on an image", "zoom around the pointer, up to the original pixels"),
    ("Drag an image", "pan; double-click: fit again"),
]

_SCRIPT = """
<script>
(() => {
  const keys = %s;
  const help = %s;
  const typing = (el) => !!el && (el.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(el.tagName));
  function toggleHelp(show) {
    let box = document.getElementById("tarfas-help");
    if (!box) {
      box = document.createElement("div");
      box.id = "tarfas-help";
      box.setAttribute("role", "dialog");
      box.setAttribute("aria-label", "Keyboard shortcuts");
      const title = document.createElement("h3");
      title.textContent = "Keyboard shortcuts";
      const table = document.createElement("table");
      for (const [k, what] of help) {
        const tr = table.insertRow();
        const a = document.createElement("kbd");
        a.textContent = k;
        tr.insertCell().appendChild(a);
        tr.insertCell().textContent = what;
      }
      box.append(title, table);
      box.addEventListener("click", () => toggleHelp(false));
      document.body.appendChild(box);
    }
    box.style.display = (show === undefined ? box.style.display !== "block" : show) ? "block" : "none";
  }
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { toggleHelp(false); return; }
    if (typing(e.target) || typing(document.activeElement)) return;  // never while typing
    if (e.key === "?" && !e.altKey && !e.ctrlKey && !e.metaKey) { e.preventDefault(); toggleHelp(); return; }
    if (!e.altKey || e.ctrlKey || e.metaKey) return;
    const id = keys[e.code];
    if (!id) return;
    const button = document.getElementById(id);
    if (!button || button.offsetParent === null) return;  // the Review tab is not showing
    e.preventDefault();
    button.click();
  });

  // Zoom and pan: the transform is kept on the <img> (data-zoom, data-x, data-y); a new image resets it.
  // The pointer may be over an overlay of the component (its buttons, its frame): take the block's image.
  const zoomImage = (t) => {
    const block = (t && t.closest) ? t.closest(".tarfas-zoom") : null;
    return block ? block.querySelector("img") : null;
  };
  function apply(img, z, x, y) {
    img.dataset.zoom = z; img.dataset.x = x; img.dataset.y = y; img.dataset.src = img.src;
    img.style.transformOrigin = "0 0";
    img.style.transform = z === 1 ? "" : `translate(${x}px, ${y}px) scale(${z})`;
    img.style.cursor = z === 1 ? "zoom-in" : "grab";
    if (img.parentElement) img.parentElement.style.overflow = "hidden";
  }
  function state(img) {
    if (img.dataset.src !== img.src) return [1, 0, 0];
    return [+(img.dataset.zoom || 1), +(img.dataset.x || 0), +(img.dataset.y || 0)];
  }
  document.addEventListener("wheel", (e) => {
    const img = zoomImage(e.target);
    if (!img) return;
    e.preventDefault();
    const [z, x, y] = state(img);
    const nz = Math.min(32, Math.max(1, z * (e.deltaY < 0 ? 1.25 : 0.8)));
    const r = img.getBoundingClientRect();
    const px = e.clientX - r.left + x, py = e.clientY - r.top + y;  // pointer in the untransformed box
    if (nz === 1) { apply(img, 1, 0, 0); return; }
    apply(img, nz, px - (px - x) * nz / z, py - (py - y) * nz / z);
  }, { passive: false });
  let drag = null;
  document.addEventListener("mousedown", (e) => {
    const img = zoomImage(e.target);
    if (!img || state(img)[0] === 1) return;
    e.preventDefault();
    const [z, x, y] = state(img);
    drag = { img, z, x, y, sx: e.clientX, sy: e.clientY };
  });
  document.addEventListener("mousemove", (e) => {
    if (!drag) return;
    apply(drag.img, drag.z, drag.x + e.clientX - drag.sx, drag.y + e.clientY - drag.sy);
  });
  document.addEventListener("mouseup", () => { drag = null; });
  document.addEventListener("dblclick", (e) => {
    const img = zoomImage(e.target);
    if (img) apply(img, 1, 0, 0);
  });
})();
</script>
"""

_STYLE = """
<style>
%s
#tarfas-help {display: none; position: fixed; z-index: 1000; top: 15%%; left: 50%%; transform: translateX(-50%%);
  background: var(--background-fill-primary, #fff); color: var(--body-text-color, #111); border: 1px solid #888;
  border-radius: 8px; padding: 12px 20px; box-shadow: 0 8px 30px rgba(0,0,0,.3);}
#tarfas-help td {padding: 3px 10px;}
#tarfas-help kbd {border: 1px solid #999; border-radius: 3px; padding: 0 5px; font-family: monospace;}
</style>
"""

HEAD = _STYLE % CSS + _SCRIPT % (
    repr(SHORTCUTS).replace("'", '"'),
    json.dumps(HELP),
)

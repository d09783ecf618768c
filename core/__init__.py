"""tarfas core: visual tools, face preprocessing, the CoT-VT protocol, the agent loop and policies."""

from pathlib import Path

__version__ = "0.1.0"

# Shipped weights live beside the packages in the checkout (the project is installed editable into .venv).
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

"""The `multidiff` command: the Typer app (app.py) and its edge (edge.py)."""
from .app import app, main

__all__ = ["app", "main"]

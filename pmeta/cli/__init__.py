"""The ``pmeta`` command line. ``app.py`` holds the core commands; each topic module below registers
its own commands on the same typer apps when imported."""

from .app import app

# topic modules register their commands on import (one line each)
from . import data  # noqa: E402,F401
from . import text  # noqa: E402,F401

__all__ = ["app"]

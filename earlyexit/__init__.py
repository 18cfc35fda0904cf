"""earlyexit: early-exit (multi-exit) networks and their training regimes."""

from .models import MultiExitModel, build_model, list_models

__version__ = "0.1.0"
__all__ = ["MultiExitModel", "build_model", "list_models"]

"""medlens: see what a medical imaging model looks at, and measure whether that picture can be trusted."""

from medlens.core.capture import LayerCapture, auto_layer, hook_count, preserved_modes, resolve_layer, trace_layers
from medlens.core.engine import METHODS, Context, Explanation, InputMethod, LayerMethod, Method, explain, get_method, register
from medlens.core.resample import normalise, upsample
from medlens.errors import MedlensError

import medlens.methods  # noqa: E402,F401  (registers the built-in methods)

__all__ = [
    "METHODS", "Context", "Explanation", "InputMethod", "LayerCapture", "LayerMethod", "MedlensError", "Method", "auto_layer",
    "explain", "get_method", "hook_count", "normalise", "preserved_modes", "register",
    "resolve_layer", "trace_layers", "upsample",
]
__version__ = "0.1.0"

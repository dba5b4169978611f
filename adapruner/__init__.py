"""adapruner: sample-aware adaptive structured pruning of LLaMA-family models."""
from adapruner.errors import AdaPrunerError

__version__ = "0.1.0"
__all__ = ["AdaPrunerError", "__version__"]

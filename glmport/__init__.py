"""glmport: hardware-portable fine-tuning for the ChatGLM / GLM-4 model family.

Importing this package imports neither torch nor transformers; the heavy modules load on first use.
"""

from glmport.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]

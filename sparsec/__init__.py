"""sparsec: an ONNX graph compiler for pruning."""

__version__ = "0.1.0"

from sparsec.api import compile, inspect  # noqa: E402
from sparsec.errors import SparsecError  # noqa: E402

__all__ = ["__version__", "compile", "inspect", "SparsecError"]

"""sparsec: an ONNX graph compiler for pruning."""

from sparsec.api import compile, inspect
from sparsec.errors import SparsecError
from sparsec.version import __version__

__all__ = ["__version__", "compile", "inspect", "SparsecError"]

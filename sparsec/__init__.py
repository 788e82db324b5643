"""sparsec: an ONNX graph compiler for pruning."""

__version__ = "0.1.0"

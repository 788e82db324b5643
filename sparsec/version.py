"""The package version, apart from sparsec/__init__.py so modules under it can read it without a cycle."""

__version__ = "0.1.0"

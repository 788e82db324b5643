"""Shared fixtures: exported transformers are slow to build, so build them once."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def transformer_models():
    from models import GOLDEN

    return {e: GOLDEN["transformer"](exporter=e) for e in ("torchscript", "dynamo")}

"""--shape in sparsec's form (NAME=d0,d1) and in trtexec/polygraphy's (NAME:d0xd1)."""

from __future__ import annotations

import pytest

from sparsec.core.options import parse_shapes
from sparsec.errors import SparsecError


def test_both_forms_and_names_with_separators() -> None:
    assert parse_shapes(["x=1,3,224,224", "ids:1x128", "input:0:1x3x8x8", "in:0=2,4"]) == {
        "x": (1, 3, 224, 224), "ids": (1, 128), "input:0": (1, 3, 8, 8), "in:0": (2, 4)}


@pytest.mark.parametrize("item", ["x", "x=", "x:", "x:1x0", "=1,2", ":1x2", "x=1x2", "x:1,2", "x=-1,2"])
def test_malformed_shapes_name_the_item(item: str) -> None:
    with pytest.raises(SparsecError, match="--shape"):
        parse_shapes([item])

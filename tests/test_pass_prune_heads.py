"""prune-heads: Q/K/V columns, O rows and head counts shrink; outputs equal the head-masked model."""

from __future__ import annotations

import numpy as np
from helpers import run
from onnx import numpy_helper
from pass_helpers import context, copy, run_pass, weights

from sparsec.transformer.attention import find_attention
from sparsec.transformer.prune_heads import PruneHeadsPass

FEEDS = {"input_ids": np.random.default_rng(0).integers(0, 100, (2, 12)).astype(np.int64),
         "attention_mask": np.ones((2, 12), np.int64)}


def _head_masked(model, block, heads):
    """The oracle: the dense model with the removed heads' rows of the output projection zeroed."""
    masked = copy(model)
    tensor = next(t for t in masked.graph.initializer if t.name == block.o.weight)
    w = numpy_helper.to_array(tensor).copy()
    for h in heads:
        w[h * block.head_dim:(h + 1) * block.head_dim] = 0.0
    tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    return masked


def test_removing_two_heads_equals_zeroing_their_output_rows(transformer_models):
    model = transformer_models["torchscript"]
    block = find_attention(model).blocks[0]
    ctx = context(model)
    result = run_pass(PruneHeadsPass({block.name: (1, 3)}), ctx)
    assert result.modified and list(result.details["blocks"]) == [block.name]
    after = find_attention(ctx.model).blocks
    assert [(b.heads, b.head_dim) for b in after] == [(2, 16), (4, 16)]  # only the named block changed
    w = weights(ctx.model)
    assert w[after[0].q.weight].shape == (64, 32) and w[after[0].o.weight].shape == (32, 64)
    assert w[after[1].q.weight].shape == (64, 64)
    want = run(_head_masked(model, block, (1, 3)), FEEDS)[0]
    got = run(ctx.model, FEEDS)[0]
    assert got.shape == want.shape == (2, 12, 64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_no_heads_to_remove_is_not_modified(transformer_models):
    model = transformer_models["torchscript"]
    ctx = context(model)
    result = run_pass(PruneHeadsPass({b.name: () for b in find_attention(model).blocks}), ctx)
    assert not result.modified and result.details == {"blocks": {}}
    assert ctx.model.SerializeToString() == model.SerializeToString()

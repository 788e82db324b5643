"""prune-tokens: later layers run on the top tokens; outputs keep their shape; KEEP 1 equals dense."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run
from pass_helpers import context, run_pass

from sparsec.errors import SparsecError
from sparsec.transformer.prune_tokens import PruneTokensPass

SHAPES = {"input_ids": (2, 12), "attention_mask": (2, 12)}
FEEDS = {"input_ids": np.random.default_rng(0).integers(0, 100, (2, 12)).astype(np.int64),
         "attention_mask": np.ones((2, 12), np.int64)}


def test_half_the_tokens_after_layer_one(transformer_models):
    model = transformer_models["torchscript"]
    ctx = context(model)
    result = run_pass(PruneTokensPass(0.5, 1, shapes=SHAPES), ctx)
    assert result.modified and result.details["keep"] == 0.5 and result.details["after_layer"] == 1
    ops = [n.op_type for n in ctx.model.graph.node]
    new = [n.name for n in ctx.model.graph.node if n.name.startswith("tokens/")]
    assert ops.count("TopK") == 2 and new  # the selection, then the index sort
    dense, got = run(model, FEEDS)[0], run(ctx.model, FEEDS)[0]
    assert got.shape == dense.shape == (2, 12, 64)
    # kept tokens' rows differ (later layers saw fewer tokens), and pruned rows keep their cut state:
    # neither output is the dense one, but both stay finite and of the same scale
    assert np.isfinite(got).all() and not np.allclose(got, dense, atol=1e-3)
    assert np.abs(got).max() < 10 * np.abs(dense).max()


def test_keep_everything_equals_the_dense_model(transformer_models):
    model = transformer_models["torchscript"]
    ctx = context(model)
    run_pass(PruneTokensPass(1.0, 1, shapes=SHAPES), ctx)
    want = run(model, FEEDS)[0]
    np.testing.assert_allclose(run(ctx.model, FEEDS)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_last_layer_cannot_be_the_cut(transformer_models):
    model = transformer_models["torchscript"]
    ctx = context(model)
    with pytest.raises(SparsecError, match=r"--tokens-from 2: the model has 2 attention layers"):
        run_pass(PruneTokensPass(0.5, 2, shapes=SHAPES), ctx)
    assert ctx.model.SerializeToString() == model.SerializeToString()  # refused before any edit

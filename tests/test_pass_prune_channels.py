"""prune-channels: the smaller graph equals the dense graph with the removed filters zeroed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import graph_lines, run
from pass_helpers import context, mlp, mlp_numpy, run_pass, weights

from sparsec.channels.channel_analysis import analyse_channels
from sparsec.channels.compensation import compute_compensation
from sparsec.channels.prune_channels import PruneChannelsPass
from sparsec.core.shapes import fixed_input_shapes, infer_shapes
from sparsec.core.tensors import TensorStore


def _analysis(model):
    return analyse_channels(model, infer_shapes(model, fixed_input_shapes(model, {})))


def _hidden_elements(analysis, channels: list[int]) -> frozenset[int]:
    """The channel elements of fc1's output (the hidden layer) at the given positions."""
    layout = analysis.layouts["h"].elems.tolist()
    return frozenset(layout[c] for c in channels)


def test_removing_hidden_channels_slices_both_layers_and_keeps_the_outputs():
    model = mlp()
    analysis = _analysis(model)
    gone = [1, 5, 6, 30]
    ctx = context(model)
    result = run_pass(PruneChannelsPass(analysis, _hidden_elements(analysis, gone)), ctx)
    assert result.modified and result.details == {"removed": 4, "recovered": 0}
    assert graph_lines(ctx.model) == graph_lines(model)  # same nodes; only constants shrink
    dense, small = weights(model), weights(ctx.model)
    kept = [c for c in range(32) if c not in gone]
    assert {k: v.shape for k, v in small.items()} == {"w1": (16, 28), "b1": (28,), "w2": (28, 8)}
    np.testing.assert_array_equal(small["w1"], dense["w1"][:, kept])
    np.testing.assert_array_equal(small["w2"], dense["w2"][kept])
    # the oracle: the dense MLP with fc1's removed filters (and their bias) zeroed
    masked = {**dense, "w1": dense["w1"].copy(), "b1": dense["b1"].copy()}
    masked["w1"][:, gone] = 0.0
    masked["b1"][gone] = 0.0
    x = np.random.default_rng(4).standard_normal((6, 16)).astype(np.float32)
    want = mlp_numpy(masked, x)
    np.testing.assert_allclose(run(ctx.model, {"x": x})[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_removed_channel_that_carries_a_constant_is_compensated_exactly():
    model = mlp()
    analysis = _analysis(model)
    gone = [0, 2]
    dense = weights(model)
    carried = np.maximum(dense["b1"][gone], 0.0)  # relu(bias): what a zeroed filter still emits
    removed = _hidden_elements(analysis, gone)
    comp = compute_compensation(model, TensorStore(Path(".")), analysis, removed, {"x": (1, 16)}).constants
    by_position = [comp[key] for key in sorted(comp, key=lambda k: k[1])]
    assert by_position == pytest.approx(carried.tolist(), abs=1e-6)
    ctx = context(model)
    run_pass(PruneChannelsPass(analysis, removed, comp), ctx)
    masked = {**dense, "w1": dense["w1"].copy()}
    masked["w1"][:, gone] = 0.0  # bias kept: the removed channels still carry relu(b)
    x = np.random.default_rng(5).standard_normal((6, 16)).astype(np.float32)
    want = mlp_numpy(masked, x)
    np.testing.assert_allclose(run(ctx.model, {"x": x})[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_nothing_removed_is_not_modified():
    model = mlp()
    ctx = context(model)
    result = run_pass(PruneChannelsPass(_analysis(model), frozenset()), ctx)
    assert not result.modified and result.details == {"removed": 0}
    assert ctx.model.SerializeToString() == model.SerializeToString()

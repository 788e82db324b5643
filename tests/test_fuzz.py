"""The fuzzer's CI slice: fixed seeds × every mode, 0 failures (bench/fuzz.py runs the long campaign)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from fuzz.checks import MODES, kept_indices, nm_violations, run_seed
from fuzz.generator import make_model

SEEDS = range(80)
BLOCK = 20


def test_generator_is_deterministic_and_covers_the_op_kinds():
    ops = collections.Counter()
    opsets = set()
    for seed in SEEDS:
        model, shapes = make_model(seed)
        again, _ = make_model(seed)
        assert model.SerializeToString() == again.SerializeToString()
        ops.update(n.op_type for n in model.graph.node)
        opsets.add(model.opset_import[0].version)
    for op in ("Conv", "BatchNormalization", "Add", "Concat", "Split", "Mul", "GlobalAveragePool",
               "Resize", "Flatten", "Gemm", "MatMul", "ConvTranspose", "Softmax", "LayerNormalization",
               "Constant", "Transpose"):
        assert ops[op] > 0, f"no {op} in {len(SEEDS)} seeds"
    assert min(opsets) <= 14 and max(opsets) >= 20


def test_nm_violations_counts_groups_on_the_given_axis():
    w = np.zeros((2, 8), np.float32)
    w[0, :3] = 1.0  # three non-zeros in the first group of 4 along axis 1
    assert nm_violations(w, 1) == 1
    assert nm_violations(w, 0) == -1  # 2 rows: not divisible by 4
    assert nm_violations(w.T.copy(), 0) == 1


def test_kept_indices_recovers_a_slicing_and_rejects_a_changed_value():
    w = np.random.default_rng(0).standard_normal((6, 5, 3, 3)).astype(np.float32)
    small = w[[0, 2, 5]][:, [1, 4]]
    assert kept_indices(w, small, 0, 1) == ([0, 2, 5], [1, 4])
    small = small.copy()
    small[1, 0, 1, 1] = np.nextafter(small[1, 0, 1, 1], np.float32(np.inf))
    assert kept_indices(w, small, 0, 1) is None


# Every seed block passes every independent check (see tests/fuzz/checks.py).
@pytest.mark.parametrize("start", range(SEEDS.start, SEEDS.stop, BLOCK))
def test_fuzz_seeds_have_no_failures(tmp_path, start):
    failures = []
    for seed in range(start, start + BLOCK):
        for case in run_seed(seed, list(MODES), tmp_path):
            failures += [f"seed {seed} {case.mode}: {cls}: {detail}" for cls, detail in case.failures]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


def test_every_generated_model_passes_the_full_checker():
    for seed in range(0, 400, 7):
        model, _ = make_model(seed)
        onnx.checker.check_model(model, full_check=True)

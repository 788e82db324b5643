"""Layer analysis: which weights are prunable, along which axes, and what is refused."""

import pytest

from models import GOLDEN
from sparsec.core.layers import find_layers
from sparsec.core.options import CompileOptions, NMPattern
from sparsec.weights.selection import nm_skip_reason, select_targets


def layers_by_name(model):
    return {layer.name: layer for layer in find_layers(model).layers}


def test_tensorrt_axes_of_conv_gemm_and_matmul():
    # Polygraphy's axes: Conv weight axis 1, MatMul B axis 0, Gemm B axis 1 if transB else 0
    cnn = layers_by_name(GOLDEN["cnn"]())
    assert (cnn["res_conv1"].reduction_axis, cnn["res_conv1"].output_axis) == (1, 0)
    assert cnn["dw_conv"].groups == 32 and cnn["grp_conv"].groups == 4
    gemm = layers_by_name(GOLDEN["gemm_transb"]())
    assert gemm["gemm_transb"].reduction_axis == 1
    assert gemm["gemm_plain"].reduction_axis == 0
    mlp = layers_by_name(GOLDEN["mlp"]())
    assert mlp["fc0_matmul"].reduction_axis == 0 and mlp["fc0_matmul"].shape == (32, 64)


def test_weights_through_identity_transpose_constant_and_left_operand():
    layers = layers_by_name(GOLDEN["weight_paths"]())
    assert [s.op for s in layers["mm_identity"].source.steps] == ["Identity"]
    assert layers["mm_constant"].source.storage == "constant"
    transposed = layers["mm_transpose"]
    assert transposed.source.stored_shape == (24, 40) and transposed.shape == (40, 24)
    assert transposed.reduction_axis == 0
    left = layers["mm_left"]
    assert (left.input_index, left.reduction_axis, left.output_axis) == (0, 1, 0)


def test_shared_weight_is_one_target_and_tied_weight_is_skipped_with_reason():
    model = GOLDEN["weight_paths"]()
    analysis = find_layers(model)
    shared = analysis.by_weight()["w_shared"]
    assert sorted(u.name for u in shared) == ["mm_shared_a", "mm_shared_b"]
    tied = [s for s in analysis.skipped if s.name == "mm_tied"]
    assert len(tied) == 1 and "gather_tied" in tied[0].reason
    targets, _ = select_targets(analysis, CompileOptions(nm=NMPattern(2, 4), min_params=0))
    weights = [t.weight for t in targets]
    assert weights.count("w_shared") == 1
    assert "emb" not in weights


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("stem_conv", "not divisible by 4"),
        ("dw_conv", "depthwise Conv"),
        ("grp_conv", "grouped Conv"),
        ("res_conv1", None),
        ("head_gemm", None),
    ],
)
def test_default_nm_goes_only_where_tensorrt_runs_it(name, expected):
    layer = layers_by_name(GOLDEN["cnn"]())[name]
    reason = nm_skip_reason(layer, 4)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason
    if name in ("dw_conv", "grp_conv"):
        everywhere = nm_skip_reason(layer, 4, everywhere=True)
        assert everywhere is None if name == "grp_conv" else "not divisible" in everywhere


def test_k_divisible_by_4_but_not_8():
    layer = layers_by_name(GOLDEN["gemm_transb"]())["gemm_k20"]
    assert nm_skip_reason(layer, 4) is None
    assert "not divisible by 8" in nm_skip_reason(layer, 8)


def test_include_exclude_and_min_params_reasons():
    analysis = find_layers(GOLDEN["cnn"]())
    opts = CompileOptions(nm=NMPattern(2, 4), include="res_", exclude="conv2$", min_params=0)
    targets, skipped = select_targets(analysis, opts)
    assert sorted(t.weight for t in targets) == ["res_conv1.weight"]
    reasons = {s.name: s.reason for s in skipped}
    assert "--exclude" in reasons["res_conv2"]
    assert "--include" in reasons["head_gemm"]
    small = select_targets(analysis, CompileOptions(nm=NMPattern(2, 4), min_params=5000))[1]
    assert any("too small" in s.reason for s in small if s.name == "br_a_conv")

"""Golden-graph checks: compile keeps the graph, prunes on TensorRT's axes, matches a reference.

The reference is built independently: Polygraphy's axis rules applied to the dense weights
with an obvious argsort mask, run in onnxruntime, compared with sparsec's output.
"""

import onnx
import pytest
from helpers import graph_lines, initializers, io_shapes, random_feeds, reference_nm_mask, run
from onnx import numpy_helper

import sparsec
from models import GOLDEN
from sparsec.weights.masks import satisfies_nm

# Independent statement of TensorRT's sparsity axes (node name -> axis of the stored weight).
EXPECTED_AXES = {
    "mlp": {"fc0_matmul": 0, "fc1_matmul": 0, "head_gemm": 0},
    "cnn": {"conv2_conv": 1, "res_conv1": 1, "res_conv2": 1, "br_a_conv": 1, "br_b_conv": 1,
            "head_gemm": 1},
    "gemm_transb": {"gemm_transb": 1, "gemm_plain": 0, "gemm_transa": 0, "gemm_k20": 1},
}
SHAPES = {
    "mlp": {"x": (3, 32)},
    "cnn": {"image": (1, 3, 32, 32)},
    "gemm_transb": {"x": (4, 64)},
}


def weight_of(model, node_name):
    node = next(n for n in model.graph.node if n.name == node_name)
    return node.input[1]


@pytest.mark.parametrize("name", sorted(EXPECTED_AXES))
def test_nm_compile_matches_independent_reference(tmp_path, name):
    dense = GOLDEN[name]()
    src = tmp_path / "dense.onnx"
    onnx.save(dense, src)
    report = sparsec.compile(src, nm="2:4", output=tmp_path / "out", min_params=0)
    pruned = onnx.load(tmp_path / "out" / "model.onnx")

    # structure: same ops, names, edges and I/O shapes
    assert graph_lines(pruned) == graph_lines(dense)
    assert io_shapes(pruned) == io_shapes(dense)

    # the reference model: dense weights masked by the obvious rule on TensorRT's axes
    reference = onnx.ModelProto()
    reference.CopyFrom(dense)
    ref_inits = {t.name: t for t in reference.graph.initializer}
    dense_w = initializers(dense)
    for node, axis in EXPECTED_AXES[name].items():
        wname = weight_of(dense, node)
        w = dense_w[wname]
        keep = reference_nm_mask(w, 2, 4, axis)
        ref_inits[wname].CopyFrom(numpy_helper.from_array(w * keep, wname))
    pruned_w = initializers(pruned)
    ref_w = initializers(reference)
    for wname in dense_w:
        assert (pruned_w[wname] == ref_w[wname]).all(), wname

    feeds = random_feeds(dense, SHAPES[name])
    for got, want in zip(run(pruned, feeds), run(reference, feeds), strict=True):
        assert got.shape == want.shape
        assert abs(got - want).max() <= 1e-5

    # report agrees with the weights
    pruned_layers = {e.name for e in report.layers if e.skipped_reason is None}
    assert pruned_layers == set(EXPECTED_AXES[name])
    for e in report.layers:
        if e.skipped_reason is None:
            assert e.sparsity == 0.5 and e.nonzeros == e.params // 2


def test_untouched_nodes_and_initializers_stay_byte_identical(tmp_path):
    dense = GOLDEN["cnn"]()
    src = tmp_path / "cnn.onnx"
    onnx.save(dense, src)
    before = src.read_bytes()
    sparsec.compile(src, nm="2:4", output=tmp_path / "out", min_params=0)
    assert src.read_bytes() == before
    pruned = onnx.load(tmp_path / "out" / "model.onnx")
    for a, b in zip(dense.graph.node, pruned.graph.node, strict=True):
        assert a.SerializeToString() == b.SerializeToString()
    pruned_inits = {t.name: t for t in pruned.graph.initializer}
    touched = {weight_of(dense, n) for n in EXPECTED_AXES["cnn"]}
    assert len(pruned.graph.initializer) == len(dense.graph.initializer)
    for t in dense.graph.initializer:
        same = t.SerializeToString() == pruned_inits[t.name].SerializeToString()
        assert same != (t.name in touched), t.name


def test_weight_paths_prune_through_identity_transpose_constant(tmp_path):
    dense = GOLDEN["weight_paths"]()
    src = tmp_path / "wp.onnx"
    onnx.save(dense, src)
    report = sparsec.compile(src, nm="2:4", output=tmp_path / "out", min_params=0)
    pruned = onnx.load(tmp_path / "out" / "model.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    inits = initializers(pruned)
    # stored [24, 40] feeds MatMul through Transpose: groups run along stored axis 1
    assert satisfies_nm(inits["w_stored"], 2, 4, axis=1)
    assert not satisfies_nm(inits["w_stored"], 2, 4, axis=0)
    assert satisfies_nm(inits["w_identity"], 2, 4, axis=0)
    assert satisfies_nm(inits["w_shared"], 2, 4, axis=0)
    assert satisfies_nm(inits["w_left"], 2, 4, axis=1)  # constant on the left: K is axis 1
    const = next(n for n in pruned.graph.node if n.output[0] == "w_const")
    assert satisfies_nm(numpy_helper.to_array(const.attribute[0].t), 2, 4, axis=0)
    assert (inits["emb"] == initializers(dense)["emb"]).all()  # tied with a Gather: untouched
    assert any(s["name"] == "mm_tied" for s in report.skipped)
    shared = [e for e in report.layers if e.weight == "w_shared"]
    assert len(shared) == 2 and report.totals["params"] == sum(
        {e.weight: e.params for e in report.layers}.values())


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_transformer_every_linear_pruned_and_verified(tmp_path, exporter, transformer_models):
    dense = transformer_models[exporter]
    src = tmp_path / "enc.onnx"
    onnx.save(dense, src)
    report = sparsec.compile(src, nm="2:4", output=tmp_path / "out", min_params=0,
                             shapes={"input_ids": (2, 7), "attention_mask": (2, 7)})
    pruned = onnx.load(tmp_path / "out" / "model.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    assert graph_lines(pruned) == graph_lines(dense)
    pruned_matmuls = [e for e in report.layers if e.op == "MatMul" and e.skipped_reason is None]
    assert len(pruned_matmuls) == 2 * 6  # q, k, v, o, ffn1, ffn2 per layer
    for e in pruned_matmuls:
        assert e.sparsity == 0.5 and e.macs_dense == 2 * 7 * e.params
    assert report.verify["inputs"]["input_ids"] == [2, 7]
    assert report.verify["max_abs_diff"] > 0  # pruning really changed the outputs


def test_unstructured_layer_group_exact_ratio(tmp_path):
    dense = GOLDEN["mlp"]()
    src = tmp_path / "mlp.onnx"
    onnx.save(dense, src)
    report = sparsec.compile(src, sparsity=0.3, group="layer", output=tmp_path / "o", min_params=0)
    for e in report.layers:
        assert e.nonzeros == e.params - round(0.3 * e.params)
    assert report.options["group"] == "layer"


def test_external_data_model_round_trip(tmp_path):
    dense = GOLDEN["mlp"]()
    src = tmp_path / "in" / "mlp.onnx"
    src.parent.mkdir()
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(dense)  # onnx.save with external data rewrites the proto it is given
    onnx.save(on_disk, src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    report = sparsec.compile(src, nm="2:4", output=tmp_path / "out", min_params=0)
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "recipe.yaml",
                                                     "report.json", "skeleton.onnx", "skeleton.onnx.data",
                                                     "weights.sparsec"]  # blobs for external data too
    pruned = onnx.load(out / "model.onnx")  # loads the external data
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    for t in onnx.load(out / "model.onnx", load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if info:
            assert int(info["offset"]) % 64 == 0
    weights = initializers(pruned)
    for node, axis in EXPECTED_AXES["mlp"].items():
        w = weights[weight_of(dense, node)]
        assert satisfies_nm(w, 2, 4, axis) and (w == 0).mean() == 0.5
    dense_w = initializers(dense)
    assert (weights["fc0.bias"] == dense_w["fc0.bias"]).all()
    assert report.verify["max_abs_diff"] > 0
    feeds = random_feeds(dense, SHAPES["mlp"])
    assert run(str(out / "model.onnx"), feeds)[0].shape == (3, 10)


def test_pruned_values_are_positive_zero_and_kept_values_bit_exact(tmp_path):
    import numpy as np

    w = np.array([[-1.0, -0.5, 2.0, -0.0], [3.0, -4.0, 0.1, -0.2]] * 4, dtype=np.float32).T
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])
    g = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                               "g", [x], [y], [numpy_helper.from_array(w, "w")])
    src = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), src)
    sparsec.compile(src, nm="2:4", output=tmp_path / "o", min_params=0)
    got = initializers(onnx.load(tmp_path / "o" / "model.onnx"))["w"]
    removed = got == 0
    assert not np.signbit(got[removed & (w != 0)]).any()  # removed weights are +0.0
    kept = ~removed
    assert (got[kept].view(np.uint32) == w[kept].view(np.uint32)).all()

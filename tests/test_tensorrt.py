"""TensorRT glue without TensorRT: commands, missing-dependency errors, log/inspector parsing, and
build_engine's plumbing against a minimal fake ``tensorrt`` module."""

from __future__ import annotations

import dataclasses
import enum
import json
import shlex
import sys
import types

import pytest

import sparsec.runtime.tensorrt as trt_mod
from sparsec.errors import MissingDependencyError, SparsecError
from sparsec.runtime.tensorrt import (
    EngineInfo,
    build_engine,
    parse_inspector_layers,
    parse_sparsity_log,
    trt_commands,
)

TRTEXEC_LOG = """\
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
[03/23/2021-00:14:05] [W] [TRT] some unrelated warning: conv9
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for \
layers: conv2, conv3
"""

INSPECTOR = {
    "Layers": [
        {"Name": "conv1 + relu1", "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f32"},
        {"Name": "conv2", "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_f16f16"},
        {"Name": "/fc/MatMul", "TacticName": "sm90_xmma_gemm_f16f16_sptensor_tn_n"},
        {"Name": "reformat", "LayerType": "Reformat"},
    ],
    "I/O Tensors": [{"Name": "x", "IOMode": "Input"}],
}


def test_trt_commands_strongly_typed_with_sparsity():
    cmds = trt_commands("out/my model.onnx", "fp16")
    assert set(cmds) == {"trtexec", "polygraphy"}
    argv = shlex.split(cmds["trtexec"])
    assert argv[0] == "trtexec"
    assert "--onnx=out/my model.onnx" in argv and "--saveEngine=out/my model.engine" in argv
    assert "--sparsity=enable" in argv and "--stronglyTyped" in argv
    assert "--profilingVerbosity=detailed" in argv
    assert not {"--fp16", "--bf16", "--sparsity=force"} & set(argv)
    assert shlex.split(cmds["polygraphy"]) == [
        "polygraphy",
        "inspect",
        "sparsity",
        "out/my model.onnx",
    ]


def test_trt_commands_fp32_adds_weakly_typed_variant_and_engine_override():
    cmds = trt_commands("m.onnx", "fp32", engine_path="e/x.plan")
    weak = shlex.split(cmds["trtexec_weakly_typed_fp16"])
    assert "--fp16" in weak and "--stronglyTyped" not in weak and "--saveEngine=e/x.plan" in weak
    assert "--exportLayerInfo=e/x.layers.json" in shlex.split(cmds["trtexec"])
    assert "trtexec_weakly_typed_fp16" not in trt_commands("m.onnx", "bf16")
    with pytest.raises(SparsecError, match="unknown precision"):
        trt_commands("m.onnx", "fp8")


def test_parse_sparsity_log_handles_trtexec_and_raw_lines():
    eligible, picked = parse_sparsity_log(TRTEXEC_LOG.splitlines())
    assert eligible == ["conv1", "conv2", "conv3"] and picked == ["conv2", "conv3"]
    raw = [
        "(Sparsity) Layers eligible for sparse math: /enc/fc1/MatMul, /enc/fc2/MatMul\r\n",
        "(Sparsity) Layers eligible for sparse math: /enc/fc1/MatMul",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: ",
    ]
    assert parse_sparsity_log(raw) == (["/enc/fc1/MatMul", "/enc/fc2/MatMul"], [])
    assert parse_sparsity_log(["nothing here", ""]) == ([], [])


def test_parse_inspector_layers_detailed_names_only_and_text():
    names, sparse = parse_inspector_layers(INSPECTOR)
    assert names == ["conv1 + relu1", "conv2", "/fc/MatMul", "reformat"]
    assert sparse == ["conv2", "/fc/MatMul"]
    assert parse_inspector_layers(json.dumps(INSPECTOR)) == (names, sparse)
    assert parse_inspector_layers('{"Layers": ["a", "b + c"], "Bindings": ["x"]}') == (
        ["a", "b + c"],
        [],
    )
    assert parse_inspector_layers("[]") == ([], [])


def test_build_engine_without_tensorrt_names_what_is_missing(tmp_path, monkeypatch):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(MissingDependencyError) as err:
        build_engine(str(onnx_path), str(tmp_path / "m.engine"))
    text = str(err.value)
    assert err.value.exit_code == 3 and "\n" not in text
    assert "TensorRT Python package not found" in text and "pip install tensorrt" in text
    assert f"trtexec --onnx={onnx_path}" in text and "--sparsity=enable" in text
    assert not (tmp_path / "m.engine").exists()


def test_build_engine_without_gpu_and_missing_file(tmp_path, monkeypatch):
    with pytest.raises(SparsecError, match="ONNX file not found") as err:
        build_engine(str(tmp_path / "none.onnx"), str(tmp_path / "e"))
    assert err.value.exit_code == 2
    (tmp_path / "m.onnx").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(trt_mod, "_cuda_devices", lambda: (0, "libcuda.so.1 not found"))
    with pytest.raises(MissingDependencyError, match="needs a CUDA GPU: libcuda.so.1 not found"):
        build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "e"))


def test_profile_shapes_single_or_min_opt_max():
    assert trt_mod._profile_shapes([1, 3, 8]) == ((1, 3, 8),) * 3
    assert trt_mod._profile_shapes(((1, 8), (4, 8), [16, 8])) == ((1, 8), (4, 8), (16, 8))


def test_cuda_probe_is_consistent():
    count, reason = trt_mod._cuda_devices()
    assert isinstance(count, int) and (count > 0) == (reason == "")


def fake_tensorrt(dynamic: bool = False, parse_ok: bool = True) -> types.ModuleType:
    """Just enough of the TensorRT 10 Python API for build_engine's control flow."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0"
    trt.seen = {"flags": set()}
    sev = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)
    trt.ILogger = type("ILogger", (), {"Severity": sev, "__init__": lambda self: None})
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NF", "EXPLICIT_BATCH STRONGLY_TYPED", start=0)
    trt.BuilderFlag = enum.IntEnum("BF", "FP16 SPARSE_WEIGHTS", start=0)
    trt.MemoryPoolType = enum.IntEnum("MP", "WORKSPACE", start=0)
    trt.ProfilingVerbosity = enum.IntEnum("PV", "DETAILED", start=0)
    trt.LayerInformationFormat = enum.IntEnum("LF", "JSON", start=0)
    inp = types.SimpleNamespace(name="x", shape=(-1, 8) if dynamic else (2, 8))
    layers = [types.SimpleNamespace(name=n) for n in ("conv1", "conv2", "fc")]
    network = types.SimpleNamespace(
        num_inputs=1, get_input=lambda i: inp, num_layers=3, get_layer=lambda i: layers[i]
    )
    config = types.SimpleNamespace(
        set_memory_pool_limit=lambda pool, size: trt.seen.update(workspace=size),
        set_flag=lambda f: trt.seen["flags"].add(f.name),
        add_optimization_profile=lambda p: trt.seen.update(profile=p.shapes),
    )
    error = types.SimpleNamespace(node_name=lambda: "/fc/Gemm", node_operator=lambda: "Gemm")
    error.desc = lambda: "unsupported weights"

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            trt.seen["network_flags"] = flags
            return network

        def create_builder_config(self):
            return config

        def create_optimization_profile(self):
            shapes = {}
            return types.SimpleNamespace(
                shapes=shapes, set_shape=lambda n, *s: shapes.__setitem__(n, s)
            )

        def build_serialized_network(self, net, cfg):
            for line in TRTEXEC_LOG.splitlines():
                self.logger.log(sev.INFO, line.split("[TRT] ")[1])
            return b"PLAN"

    trt.Builder = Builder
    trt.OnnxParser = lambda net, logger: types.SimpleNamespace(
        parse_from_file=lambda path: parse_ok, num_errors=1, get_error=lambda i: error
    )
    inspector = types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps(INSPECTOR))
    engine = types.SimpleNamespace(create_engine_inspector=lambda: inspector)
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda p: engine)
    return trt


@pytest.fixture
def onnx_file(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_mod, "_cuda_devices", lambda: (1, ""))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"onnx")
    return path


def test_build_engine_reports_sparse_layers_and_writes_atomically(onnx_file, monkeypatch):
    fake = fake_tensorrt(dynamic=True)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    engine_path = onnx_file.parent / "sub" / "m.engine"
    info = build_engine(str(onnx_file), str(engine_path), workspace_mib=64, shapes={"x": (4, 8)})
    assert engine_path.read_bytes() == b"PLAN"
    assert sorted(p.name for p in engine_path.parent.iterdir()) == ["m.engine"]
    assert info.layers == ("conv1", "conv2", "fc") and info.trt_version == "10.9.0"
    assert info.eligible_sparse == ("conv1", "conv2", "conv3")
    assert info.sparse_layers == ("conv2", "conv3") and info.sparse_source == "log"
    assert info.inspector_sparse == ("conv2", "/fc/MatMul")
    assert len(info.log_lines) == 2 and all("sparse" in m.lower() for m in info.log_lines)
    assert fake.seen["network_flags"] == 1 << 1  # STRONGLY_TYPED only; no EXPLICIT_BATCH on 10
    assert fake.seen["flags"] == {"SPARSE_WEIGHTS"} and fake.seen["workspace"] == 64 << 20
    assert fake.seen["profile"] == {"x": ((4, 8), (4, 8), (4, 8))}
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.sparse_layers = ()  # type: ignore[misc]
    assert isinstance(info, EngineInfo)


def test_build_engine_weakly_typed_and_error_paths(onnx_file, monkeypatch):
    fake = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    build_engine(str(onnx_file), str(onnx_file.with_suffix(".engine")), strongly_typed=False)
    assert fake.seen["network_flags"] == 0 and fake.seen["flags"] == {"SPARSE_WEIGHTS", "FP16"}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(dynamic=True))
    with pytest.raises(SparsecError, match=r"input 'x' has dynamic shape \(-1, 8\)"):
        build_engine(str(onnx_file), str(onnx_file.with_suffix(".e2")))
    with pytest.raises(SparsecError, match="unknown input 'y'"):
        build_engine(str(onnx_file), str(onnx_file.with_suffix(".e2")), shapes={"y": (1,)})
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(parse_ok=False))
    with pytest.raises(SparsecError, match=r"node /fc/Gemm \(Gemm\): unsupported weights"):
        build_engine(str(onnx_file), str(onnx_file.with_suffix(".e3")))
    assert not onnx_file.with_suffix(".e2").exists() and not onnx_file.with_suffix(".e3").exists()

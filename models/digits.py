"""A small CNN trained on scikit-learn's 8×8 digits, exported to ONNX with BatchNorm left unfused.

``train_digits_cnn`` trains in torch (CPU, deterministic from ``seed``), exports with the TorchScript
exporter at opset 17 (symbolic batch) and caches the ONNX file in ``cache_dir`` so reruns skip training.
The stem conv has 1 input channel (288 weights): sparsec's 2:4 must leave it dense, since its reduction
dimension is not divisible by 4. The other convs and both Linear layers are 2:4-eligible.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

SPLIT_SEED = 0  # the train/test split is fixed; ``seed`` only drives initialisation and shuffling
OPSET = 17


@dataclass(frozen=True)
class DigitsModel:
    """A trained digits CNN (ONNX) with its data: x float32 [N, 1, 8, 8] in [0, 1], y int64 [N]."""

    model: onnx.ModelProto
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits, 75/25 stratified split (fixed seed), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SPLIT_SEED)
    return (np.ascontiguousarray(x_tr), np.ascontiguousarray(y_tr),
            np.ascontiguousarray(x_te), np.ascontiguousarray(y_te))


def _make_net() -> Any:
    from torch import nn

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def _train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> Any:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny net: one thread is fastest, and immune to a busy machine's contention
    try:
        return _train_loop(x, y, seed, epochs)
    finally:
        torch.set_num_threads(threads)


def _train_loop(x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _make_net()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * -(-len(x) // 64))
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                sched.step()
    return net.eval()


def _export(net: Any, path: Path) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        staged = Path(tmp) / "digits.onnx"
        torch.onnx.export(
            net, (torch.zeros(1, 1, 8, 8),), str(staged), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )
        model = onnx.load(str(staged))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        raise RuntimeError("the digits export lost its BatchNormalization nodes")
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path.with_name(path.name + ".partial")))
    path.with_name(path.name + ".partial").replace(path)


def train_digits_cnn(seed: int = 0, cache_dir: str | Path | None = None, epochs: int = 8) -> DigitsModel:
    """Train (or load from ``cache_dir``) the digits CNN and return it with the fixed data split."""
    x_tr, y_tr, x_te, y_te = load_digits_split()
    cached = Path(cache_dir) / f"digits_cnn_1t_s{seed}_e{epochs}.onnx" if cache_dir is not None else None
    if cached is not None and cached.exists():
        return DigitsModel(onnx.load(str(cached)), x_tr, y_tr, x_te, y_te)
    net = _train(x_tr, y_tr, seed, epochs)
    with tempfile.TemporaryDirectory() as tmp:
        path = cached if cached is not None else Path(tmp) / "digits.onnx"
        _export(net, path)
        model = onnx.load(str(path))
    return DigitsModel(model, x_tr, y_tr, x_te, y_te)


def accuracy(model: str | Path | onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX classifier on (x, y) via onnxruntime (CPU)."""
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    (logits,) = sess.run(None, {name: x.astype(np.float32)})
    return float((logits.argmax(axis=1) == y).mean())

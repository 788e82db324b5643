"""Run the dense and the rewritten model on the same inputs and measure the difference."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
from sparsec.runtime.session import make_session, random_feeds


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_dense: float
    cosine: float


@dataclass(frozen=True)
class VerifyResult:
    """How far the rewritten model's outputs are from the dense model's."""

    max_abs_diff: float
    mean_abs_diff: float
    outputs: tuple[OutputDiff, ...]
    inputs: dict[str, list[int]]
    seed: int

    def as_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "outputs": [asdict(o) for o in self.outputs],
            "inputs": self.inputs,
            "seed": self.seed,
        }


def compare_outputs(dense: list[np.ndarray], other: list[np.ndarray], names: list[str]):
    """Per-output differences, in float64."""
    diffs = []
    for name, a, b in zip(names, dense, other, strict=True):
        a64 = np.asarray(a, dtype=np.float64).ravel()
        b64 = np.asarray(b, dtype=np.float64).ravel()
        d = np.abs(a64 - b64)
        denom = float(np.linalg.norm(a64) * np.linalg.norm(b64))
        cosine = float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))
        diffs.append(OutputDiff(
            name=name,
            max_abs_diff=float(d.max()) if d.size else 0.0,
            mean_abs_diff=float(d.mean()) if d.size else 0.0,
            max_abs_dense=float(np.abs(a64).max()) if a64.size else 0.0,
            cosine=cosine,
        ))
    return tuple(diffs)


def verify_models(
    dense_path: str | os.PathLike,
    other_path: str | os.PathLike,
    shapes: dict[str, tuple[int, ...]],
    seed: int = 0,
) -> VerifyResult:
    """Both models in onnxruntime on the same random inputs (dtypes respected)."""
    dense = make_session(dense_path)
    other = make_session(other_path)
    feeds = random_feeds(dense, shapes, seed)
    names = [o.name for o in dense.get_outputs()]
    diffs = compare_outputs(dense.run(names, feeds), other.run(names, feeds), names)
    return VerifyResult(
        max_abs_diff=max((d.max_abs_diff for d in diffs), default=0.0),
        mean_abs_diff=float(np.mean([d.mean_abs_diff for d in diffs])) if diffs else 0.0,
        outputs=diffs,
        inputs={k: list(v.shape) for k, v in feeds.items()},
        seed=seed,
    )

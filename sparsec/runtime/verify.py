"""Run the dense and the rewritten model on the same inputs and measure the difference.

The inputs decide what a verification can show: real calibration samples when there are some, else random
draws that respect --calib-range and --shape. A dense output that is constant on those inputs (all zeros
from a detector on noise) makes its comparison meaningless, so it is flagged instead of read as a score.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from sparsec.runtime.next_token import agreement, logits_output
from sparsec.runtime.session import make_session, random_feeds, run_checked, session_cache_fill

VERIFY_SAMPLES = 8  # calibration samples both models run on
DEGENERATE_RTOL = 1e-6  # a dense output with std below this × max|x| is constant
NEAR_ZERO = 1e-5  # a dense output below this everywhere is "nothing found" (a detector on noise)


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_dense: float
    cosine: float
    degenerate: str | None = None  # why the dense output carries no information (None: it does)


@dataclass(frozen=True)
class VerifyInputs:
    """The feeds both models run on, where they came from, and symbolic dims that were guessed as 1."""

    batches: list[dict[str, np.ndarray]]
    source: str
    assumed_dims: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyResult:
    """How far the rewritten model's outputs are from the dense model's."""

    max_abs_diff: float
    mean_abs_diff: float
    outputs: tuple[OutputDiff, ...]
    inputs: dict[str, list[int]]
    seed: int
    source: str = "random"
    assumed_dims: dict[str, list[int]] = field(default_factory=dict)
    next_token: dict | None = None  # greedy agreement of a language model's logits (next_token.py)

    @property
    def informative(self) -> bool:
        """False when every dense output is constant on the inputs: then no number here means anything."""
        return not all(o.degenerate for o in self.outputs)

    def as_dict(self) -> dict:
        out = {
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "outputs": [asdict(o) for o in self.outputs],
            "inputs": self.inputs,
            "seed": self.seed,
            "source": self.source,
            "informative": self.informative,
        }
        flat = {o.name: o.degenerate for o in self.outputs if o.degenerate}
        if flat and self.informative:  # e.g. a mask or shape output: left out of the summary's min cosine
            out["uninformative_outputs"] = flat
        if not self.informative:
            hint = "give other samples" if "calibration samples" in self.source else \
                "verify on real inputs (--calib) or set --calib-range and --shape"
            out["reason"] = "; ".join(f"dense output {k} {v}" for k, v in flat.items()) + \
                f" on these inputs, so the comparison says nothing: {hint}"
        if self.assumed_dims:
            out["assumed_dims"] = self.assumed_dims
        if self.next_token is not None:
            out["next_token"] = self.next_token
        return out


def degenerate(values: np.ndarray) -> str | None:
    """Why a dense output cannot tell a good rewrite from a bad one: it is empty or constant."""
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        return "is empty"
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad:
        return f"holds {bad} NaN/Inf values"
    peak = float(np.abs(a).max())
    if peak == 0.0:
        return "is all zeros"
    if peak < NEAR_ZERO:
        return f"is near zero everywhere (max |x| {peak:.2g})"
    if np.isfinite(peak) and float(a.std()) <= DEGENERATE_RTOL * peak:
        return f"is constant ({a[0]:.4g})"
    return None


def compare_outputs(dense: list[np.ndarray], other: list[np.ndarray], names: list[str]):
    """Per-output differences, in float64."""
    diffs = []
    for name, a, b in zip(names, dense, other, strict=True):
        a64 = np.asarray(a, dtype=np.float64).ravel()
        b64 = np.asarray(b, dtype=np.float64).ravel()
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf outputs: flagged as degenerate
            d = np.subtract(a64, b64)
            np.abs(d, out=d)  # in place: a language model's logits are hundreds of MB in float64
        max_d, mean_d = (float(d.max()), float(d.mean())) if d.size else (0.0, 0.0)
        del d
        denom = float(np.linalg.norm(a64) * np.linalg.norm(b64))
        cosine = float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))
        diffs.append(OutputDiff(
            name=name,
            max_abs_diff=max_d,
            mean_abs_diff=mean_d,
            max_abs_dense=float(np.abs(a64).max()) if a64.size else 0.0,
            cosine=cosine,
            degenerate=degenerate(a64),
        ))
    return tuple(diffs)


def run_batches(session, names: list[str], batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Every output over every batch, flattened and concatenated (batches may differ in shape)."""
    runs = [run_checked(session, names, feeds) for feeds in batches]
    return [np.concatenate([np.asarray(r[i]).ravel() for r in runs]) for i in range(len(names))]


def calibration_inputs(data, batch: int, samples: int = VERIFY_SAMPLES) -> VerifyInputs:
    """The first calibration samples, batched as calibration batches them."""
    head = data.head(samples)
    source = f"{head.num_samples} calibration samples from {data.source}"
    return VerifyInputs(list(head.batches(batch)), source)


def random_inputs(session, shapes: dict[str, tuple[int, ...]], seed: int,
                  ranges: dict[str, tuple[float, float]] | None = None,
                  assumed_dims: dict[str, list[int]] | None = None) -> VerifyInputs:
    """One random feed: floats N(0, 1), integers in [0, 2), or uniform in each --calib-range."""
    ranged = ", ".join(f"{k} in [{lo:g}, {hi:g})" for k, (lo, hi) in (ranges or {}).items())
    source = f"random inputs (seed {seed}; {ranged + ', else ' if ranged else ''}floats N(0,1), " \
             "integers in [0, 2))"
    feeds = random_feeds(session, shapes, seed, ranges=ranges)
    if (fill := session_cache_fill(session)) is not None:
        source += f"; {fill.describe()}"
    return VerifyInputs([feeds], source, dict(assumed_dims or {}))


def verify_models(
    dense_path: str | os.PathLike,
    other_path: str | os.PathLike,
    shapes: dict[str, tuple[int, ...]],
    seed: int = 0,
    inputs: VerifyInputs | None = None,
) -> VerifyResult:
    """Both models in onnxruntime on the same inputs: `inputs`, or one random feed (dtypes respected)."""
    dense = make_session(dense_path)
    inputs = inputs or random_inputs(dense, shapes, seed)
    names = [o.name for o in dense.get_outputs()]
    runs_dense = [run_checked(dense, names, feeds) for feeds in inputs.batches]
    cached = session_cache_fill(dense) is not None
    del dense  # one model in onnxruntime at a time: a large model's weights are not held twice
    other = make_session(other_path)
    runs_other = [run_checked(other, names, feeds) for feeds in inputs.batches]
    del other
    diffs = compare_outputs(_flat(runs_dense, len(names)), _flat(runs_other, len(names)), names)
    shapes = [np.shape(r) for r in runs_dense[0]]
    lm = logits_output(names, shapes, cached)
    tokens = None if lm is None else \
        agreement(names[lm], [r[lm] for r in runs_dense], [r[lm] for r in runs_other])
    return VerifyResult(
        max_abs_diff=max((d.max_abs_diff for d in diffs), default=0.0),
        mean_abs_diff=float(np.mean([d.mean_abs_diff for d in diffs])) if diffs else 0.0,
        outputs=diffs,
        inputs={k: list(v.shape) for k, v in inputs.batches[0].items()},
        seed=seed,
        source=inputs.source,
        assumed_dims=inputs.assumed_dims,
        next_token=tokens,
    )


def _flat(runs: list[list[np.ndarray]], n: int) -> list[np.ndarray]:
    return [np.concatenate([np.asarray(r[i]).ravel() for r in runs]) for i in range(n)]

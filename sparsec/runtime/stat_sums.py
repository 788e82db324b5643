"""Calibration statistics as float64 sums over batches: added batch by batch, merged across workers."""

from __future__ import annotations

import numpy as np

from sparsec.runtime.instrument import StatSpec


class StatSums:
    """Σx², Σx, row counts and Gram matrices of every instrumented tensor, plus the samples seen.

    Every statistic is a sum over samples, so shards of the data summed apart and then merged give
    the single-process result up to the order of the float64 additions.
    """

    def __init__(self, spec_list: list[StatSpec]) -> None:
        self.specs = spec_list
        self.sums = {o: np.zeros(s.channels) for s in spec_list for o in (s.sumsq_output, s.sum_output)}
        self.grams = {s.gram_output: np.zeros((s.channels, s.channels)) for s in spec_list if s.gram_output}
        self.rows = {s.size_output: 0 for s in spec_list}
        self.seen = 0

    def add(self, outs: dict[str, np.ndarray], samples: int) -> None:
        """One batch's reducer outputs (keyed by output name) covering `samples` samples."""
        for spec in self.specs:
            self.sums[spec.sumsq_output] += outs[spec.sumsq_output]
            self.sums[spec.sum_output] += outs[spec.sum_output]
            self.rows[spec.size_output] += int(outs[spec.size_output]) // spec.channels
            if spec.gram_output:
                self.grams[spec.gram_output] += outs[spec.gram_output]
        self.seen += samples

    def merge(self, other: StatSums) -> None:
        """Add another shard's sums (same specs) into these."""
        for key, value in other.sums.items():
            self.sums[key] += value
        for key, value in other.grams.items():
            self.grams[key] += value
        for key, value in other.rows.items():
            self.rows[key] += value
        self.seen += other.seen

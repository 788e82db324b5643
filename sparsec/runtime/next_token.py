"""Greedy next-token agreement of a language model: what a pruned decoder changes in generation.

Cosine on logits hides what a user sees: whether the pruned model picks the same next token. For a model
with a `*logits` output [B, S, V] (or, in a decoder with a KV cache, its first [B, S, V] float output that
is not a present), the share of positions where argmax over V agrees: at the last position of each
sequence (the token greedy decoding emits) and over all positions.
"""

from __future__ import annotations

import numpy as np


def logits_output(names: list[str], shapes: list[tuple], decoder: bool) -> int | None:
    """Index of the logits output, or None (not a language model)."""
    for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        if name.lower().endswith("logits") and len(shape) == 3:
            return i
    if decoder:
        return next((i for i, (n, s) in enumerate(zip(names, shapes, strict=True))
                     if len(s) == 3 and not n.lower().startswith("present")), None)
    return None


def agreement(name: str, dense: list[np.ndarray], other: list[np.ndarray]) -> dict:
    """Argmax agreement over the vocabulary axis, per batch of [B, S, V] logits."""
    last = every = n_last = n_every = 0
    for a, b in zip(dense, other, strict=True):
        pa, pb = np.argmax(a, axis=-1), np.argmax(b, axis=-1)
        last += int(np.count_nonzero(pa[:, -1] == pb[:, -1]))
        every += int(np.count_nonzero(pa == pb))
        n_last, n_every = n_last + pa.shape[0], n_every + pa.size
    return {"output": name, "last_position": last / max(n_last, 1), "all_positions": every / max(n_every, 1),
            "sequences": n_last, "positions": n_every}

"""Decoder inputs that calibration and verification fill in: an empty KV cache, the mask and positions.

A decoder exported with its cache (optimum, torch, onnxruntime-genai) takes `past_key_values.N.key/value`
[B, H, P, D] beside `input_ids`; a prompt has P = 0. Users have token sequences, not caches, so where
they give none sparsec fills in what generation's first step feeds: every past tensor empty along its
past axis, `attention_mask` all ones (over past + new tokens), `position_ids` from the mask's running
count (0..S-1 without padding). A past input is recognised by name (past_key_values.* / past.* /
past_key* / past_value*) and shape: one symbolic axis besides the batch, the others fixed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sparsec.runtime.calib_checks import InputSpec, Source

_PAST = re.compile(r"^past(_key_values|_keys?|_values?)?([._]|\d)", re.IGNORECASE)
_ANCHORS = ("input_ids", "inputs_embeds")


@dataclass(frozen=True)
class CacheFill:
    """Which inputs a decoder's first step can do without, and how each is filled."""

    anchor: str  # [B, S, ...]: the tokens that give batch and sequence length
    anchor_rank: int
    past: tuple[tuple[InputSpec, int], ...]  # (input, its past-length axis)
    mask: InputSpec | None
    positions: InputSpec | None

    @property
    def names(self) -> frozenset[str]:
        extra = [s.name for s in (self.mask, self.positions) if s is not None]
        return frozenset([s.name for s, _ in self.past] + extra)

    def fill(self, feed: dict[str, np.ndarray], lead: int = 0) -> dict[str, np.ndarray]:
        """`feed` plus every fillable input it lacks; `lead` sample axes come before each input's own."""
        out = dict(feed)
        ids = out[self.anchor]
        outer, seq = ids.shape[:lead + 1], ids.shape[lead + 1]
        given = [out[s.name].shape[lead + axis] for s, axis in self.past if s.name in out]
        past_len = given[0] if given else 0
        for spec, axis in self.past:
            if spec.name not in out:
                dims = [past_len if i == axis else d for i, d in enumerate(spec.shape)][1:]
                out[spec.name] = np.zeros((*outer, *dims), spec.dtype)
        if self.mask is not None and self.mask.name not in out:
            out[self.mask.name] = np.ones((*outer, past_len + seq), self.mask.dtype)
        if self.positions is not None and self.positions.name not in out:
            mask = out[self.mask.name] if self.mask is not None else np.ones((*outer, past_len + seq))
            pos = np.maximum(np.cumsum(mask.astype(np.int64), axis=-1) - 1, 0)[..., past_len:]
            out[self.positions.name] = pos.astype(self.positions.dtype)
        return out

    def describe(self, given: set[str] | frozenset[str] = frozenset()) -> str:
        """One line naming what was filled (the report's calibration/verification source)."""
        parts = []
        past = [s.name for s, _ in self.past if s.name not in given]
        if past:
            parts.append(f"empty KV cache (past length 0) for {len(past)} inputs {past[0]}..{past[-1]}")
        if self.mask is not None and self.mask.name not in given:
            parts.append(f"{self.mask.name} all ones")
        if self.positions is not None and self.positions.name not in given:
            parts.append(f"{self.positions.name} from the mask (0..S-1)")
        return "filled: " + ", ".join(parts) if parts else ""

    def source(self, inner: Source, given: set[str]) -> Source:
        """A calibration source whose chunks (samples on a leading axis) get the missing inputs."""
        def chunks(hint: int):
            for chunk, where in inner.chunks(hint):
                yield self.fill(chunk, lead=1), where
        note = self.describe(given)
        return Source(f"{inner.label} ({note})" if note else inner.label, inner.count, chunks, inner.checked)

    def reader(self, inner: object) -> object:
        """A calibration reader whose feeds get the inputs they lack (rank r or r+1 feeds)."""
        return _FillingReader(self, inner)


class _FillingReader:
    def __init__(self, fill: CacheFill, inner: object) -> None:
        self._fill, self._inner = fill, inner
        if callable(getattr(inner, "rewind", None)):
            self.rewind = inner.rewind

    def get_next(self):
        feed = self._inner.get_next()
        anchor = self._fill.anchor
        if not isinstance(feed, dict) or anchor not in feed:
            return feed  # validation names what is wrong
        lead = np.ndim(feed[anchor]) - self._fill.anchor_rank
        return self._fill.fill(feed, lead=lead) if lead in (0, 1) else feed


def _past_axis(spec: InputSpec) -> int | None:
    """The one symbolic axis besides the batch of a cache-shaped input (the others fixed), else None."""
    if not _PAST.match(spec.name) or len(spec.shape) < 3 or spec.dtype.kind != "f":
        return None
    symbolic = [i for i, d in enumerate(spec.shape) if i > 0 and not isinstance(d, int)]
    return symbolic[0] if len(symbolic) == 1 else None


def plan_cache_fill(specs: list[InputSpec]) -> CacheFill | None:
    """The fill plan of a decoder with a KV cache, or None (no cache input, or no token input)."""
    past = tuple((s, axis) for s in specs if (axis := _past_axis(s)) is not None)
    by_name = {s.name: s for s in specs}
    anchor = next((n for n in _ANCHORS if n in by_name and len(by_name[n].shape) >= 2), None)
    if not past or anchor is None:
        return None
    mask = by_name.get("attention_mask")
    positions = by_name.get("position_ids")
    mask = mask if mask is not None and len(mask.shape) == 2 else None
    positions = positions if positions is not None and len(positions.shape) == 2 else None
    return CacheFill(anchor, len(by_name[anchor].shape), past, mask, positions)

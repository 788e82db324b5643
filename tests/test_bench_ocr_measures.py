"""The OCR quality measures of bench/quality_ocr.py and the row-flag parsing of bench/quality.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402
import quality_ocr as q  # noqa: E402


def _onehot(seq: list[int], classes: int = 5) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[seq]


def test_ctc_greedy_collapses_repeats_and_drops_blank() -> None:
    logits = np.stack([_onehot([0, 1, 1, 0, 1, 2, 2, 0]), _onehot([0, 0, 0, 0, 0, 0, 0, 0])])
    assert q.ctc_greedy(logits) == [[1, 1, 2], []]  # a blank between repeats keeps both


def test_char_agreement_is_one_minus_normalised_edit_distance() -> None:
    assert q.edit_distance("kitten", "sitting") == 3
    assert q.char_agreement("kitten", "sitting") == pytest.approx(1 - 3 / 7, abs=1e-12)
    assert q.char_agreement([], []) == 1.0
    assert q.char_agreement([1, 2], []) == 0.0


def test_prob_boxes_and_matching() -> None:
    prob = np.zeros((20, 30), np.float32)
    prob[2:5, 3:10] = 0.9  # one component
    prob[10:15, 20:28] = 0.5  # another
    prob[18, 0] = 0.2  # below the 0.3 threshold
    boxes = q.prob_boxes(prob)
    assert sorted(boxes) == [(2, 3, 5, 10), (10, 20, 15, 28)]
    assert q.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7, abs=1e-12)
    shifted = [(2, 3, 5, 10)]  # the second dense box has no partner: IoU 0
    assert q.matched_ious(boxes, shifted) == [1.0, 0.0]


def test_flag_kwargs_maps_cli_flags_to_api_keywords() -> None:
    got = quality.flag_kwargs(("--channels", "0.3", "--channel-score", "act", "--recover",
                               "--no-bias-correct", "--round-to", "8"))
    assert got == {"channels": 0.3, "channel_score": "act", "recover": True, "bias_correct": False,
                   "round_to": 8}
    assert isinstance(got["round_to"], int)

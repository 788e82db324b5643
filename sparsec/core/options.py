"""Compile options as frozen data, validated once with errors that name the option."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sparsec.errors import SparsecError

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")
PRECISIONS = ("fp32", "fp16", "bf16")
GROUPS = ("output", "layer", "input")  # where N:M and magnitude scores compare
FORMATS = ("dense", "bitmap", "rle", "coo", "csr", "csc", "nm_hw", "nm_rank")  # --encode's codecs


@dataclass(frozen=True)
class NMPattern:
    """Keep at most n non-zeros in every m consecutive weights along the reduction axis."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not match:
            raise SparsecError(f"--nm {text!r} is not of the form N:M", "e.g. --nm 2:4")
        n, m = int(match.group(1)), int(match.group(2))
        if m < 2 or n < 1 or n >= m:
            raise SparsecError(
                f"--nm {text}: need 1 <= N < M and M >= 2", "e.g. --nm 2:4 or --nm 4:8"
            )
        if m > 64:
            raise SparsecError(f"--nm {text}: M must be at most 64")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_shapes(items: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """`NAME=d0,d1,...` items, or trtexec/polygraphy's `NAME:d0xd1x...`, into a dict, with an error
    naming the bad item. The last `=` or `:` splits, so names may hold either (`input:0`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        cut = max(item.rfind("="), item.rfind(":"))
        name, dims = (item[:cut], item[cut + 1:]) if cut > 0 else ("", "")
        sep = "," if item[cut] == "=" else "x"
        try:
            parsed = tuple(int(d) for d in dims.split(sep)) if dims else None
        except ValueError:
            parsed = None
        if not name or parsed is None or any(d < 1 for d in parsed):
            raise SparsecError(f"--shape {item!r} is not NAME=d0,d1,... (or NAME:d0xd1x...) with "
                               "positive dims", "e.g. --shape input_ids=1,128 or --shape x:1x3x224x224")
        _check_input_size(item, parsed)
        shapes[name] = parsed
    return shapes


def _check_input_size(item: str, dims: tuple[int, ...]) -> None:
    """Refuse a shape whose one input would not fit in a quarter of this machine's memory."""
    nbytes = math.prod(dims) * 8  # the widest input dtype sparsec draws (int64/double)
    limit = _physical_memory() // 4
    if nbytes > limit:
        raise SparsecError(f"--shape {item!r}: one such input takes {nbytes / 2**30:.1f} GiB, more than "
                           f"a quarter of this machine's {4 * limit / 2**30:.0f} GiB",
                           "give smaller dims (the batch size does not change what is pruned)")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


# Stages an option belongs to (sparsec/recipes/__init__.py orders them); "settings" are shared by all
# stages (data, shapes, verification) and "run" are per-invocation (never written to a recipe file).
SETTINGS, RUN = "settings", "run"


def opt(default: Any = None, *, stage: str, help: str, factory: Any = None, **cli: Any) -> Any:
    """A declared option: its default, the stage it belongs to, its help text and how the CLI spells
    it (`flag`, `metavar`, `choices`, `kind`: value | flag | pair | multi, `parse`: a value parser's
    name in sparsec.recipes.PARSERS). The CLI options, the API keywords, the recipe file keys and
    `as_dict` are all generated from these fields."""
    meta = {"stage": stage, "help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class CompileOptions:
    """Everything `sparsec compile` can be asked to do: one declaration per option."""

    # weights: N:M / unstructured sparsity of the remaining weights
    nm: NMPattern | None = opt(stage="weights", metavar="N:M", parse="nm",
                               help="N:M pattern along the reduction axis, e.g. 2:4 or 4:8.")
    sparsity: float | None = opt(stage="weights", metavar="S", help="Unstructured sparsity in [0, 1).")
    method: str = opt("magnitude", stage="weights", choices=METHODS,
                      help="Weight score: magnitude, wanda (|W|·‖X‖) or sparsegpt (second order with "
                           "weight update); wanda and sparsegpt need calibration.")
    group: str = opt("output", stage="weights", choices=GROUPS,
                     help="Comparison group for unstructured pruning.")
    include: str | None = opt(stage="weights", metavar="REGEX",
                              help="Prune only layers whose node name matches.")
    exclude: str | None = opt(stage="weights", metavar="REGEX",
                              help="Leave layers whose node name matches dense.")
    nm_everywhere: bool = opt(False, stage="weights", kind="flag",
                              help="Apply N:M also where TensorRT cannot use it (grouped/depthwise conv).")
    min_params: int = opt(256, stage="weights", metavar="N", help="Leave layers with fewer weights dense.")
    sequential: bool = opt(False, stage="weights", kind="flag",
                           help="Calibrate level by level with earlier layers already pruned.")
    damp: float = opt(0.01, stage="weights", metavar="F",
                      help="SparseGPT damping, as a fraction of the mean Hessian diagonal.")
    block_size: int = opt(128, stage="weights", metavar="N", help="SparseGPT block size.")
    owl: bool = opt(False, stage="weights", kind="flag",
                    help="Outlier-weighed layerwise sparsity (unstructured only).")
    owl_lambda: float = opt(0.08, stage="weights", metavar="L",
                            help="OWL: layer sparsities stay within S ± L.")
    owl_m: float = opt(5.0, stage="weights", metavar="M",
                       help="OWL: a score above M times its layer's mean is an outlier.")
    # channels: structured removal of whole channels
    channels: float | None = opt(stage="channels", metavar="R",
                                 help="Remove this fraction of the prunable channels (global ranking).")
    channels_per_layer_max: float = opt(1.0, stage="channels", metavar="F",
                                        help="At most this fraction of any one layer's channels goes.")
    channel_score: str = opt("l1", stage="channels", choices=("l1", "l2", "bn", "act"),
                             help="Channel importance: filter norms, BatchNorm |gamma|, or calibrated "
                                  "activation x outgoing weights.")
    round_to: int = opt(1, stage="channels", metavar="K",
                        help="Kept channel counts stay multiples of K (e.g. 8 for tensor cores).")
    recover: bool = opt(False, stage="channels", kind="flag",
                        help="Refit consumers on the kept channels by least squares (needs calibration).")
    # fold-bn
    fold_bn: bool | None = opt(stage="fold-bn", kind="pair",  # None: on with --channels, else off
                               help="Fold BatchNormalization into the preceding layer (default: on with "
                                    "--channels; before --nm/--sparsity; alone, a fold-only compile).")
    # transformer: heads, FFN neurons, tokens
    heads: float | None = opt(stage="transformer", metavar="R",
                              help="Remove this fraction of attention heads (global ranking, one kept per "
                                   "layer).")
    heads_per_layer: int | None = opt(stage="transformer", metavar="N",
                                      help="Keep exactly N heads in every layer.")
    ffn: float | None = opt(stage="transformer", metavar="R", help="Remove this fraction of FFN neurons.")
    tokens: float | None = opt(stage="transformer", metavar="KEEP",
                               help="Token pruning: later layers keep the top ceil(KEEP*L) tokens plus the "
                                    "first.")
    tokens_from: int = opt(1, stage="transformer", metavar="LAYER",
                           help="Score tokens with this layer's attention (1-based); later layers run "
                                "pruned.")
    # precision
    precision: str = opt("fp32", stage="precision", choices=PRECISIONS,
                         help="Convert the output model (TensorRT's sparse kernels need fp16/bf16).")
    # encode
    encode: str = opt("auto", stage="encode", choices=("auto", "none", *FORMATS),  # auto | a format | none
                      help="Blob encoding of pruned weights in weights.sparsec (auto: smallest per tensor).")
    rle_bits: int = opt(4, stage="encode", metavar="B", help="Run-length field width in bits.")
    sparse_initializers: bool = opt(False, stage="encode", kind="flag",
                                    help="Store pruned weights as ONNX sparse initializers (COO) in "
                                         "model.onnx.")
    # settings shared by every stage
    shapes: dict[str, tuple[int, ...]] = opt(
        stage=SETTINGS, factory=dict, flag="--shape", kind="multi", parse="shapes",
        metavar="NAME=d0,d1|NAME:d0xd1",
        help="Fix an input's symbolic dims for verification and MAC counts (repeatable).")
    calib: Any = opt(stage=SETTINGS, metavar="FILE.npz|DIR", parse="path",  # or a reader with get_next()
                     help="Calibration data: arrays keyed by input name, axis 0 = samples.")
    calib_random: int | None = opt(stage=SETTINGS, metavar="N",
                                   help="Draw N calibration samples from the input spec.")
    calib_range: dict[str, tuple[float, float]] = opt(
        stage=SETTINGS, factory=dict, kind="multi", parse="ranges", metavar="NAME=lo,hi",
        help="Value range [lo, hi) of a random input for --calib-random and for verification without "
             "--calib, e.g. input_ids=0,30522 (repeatable).")
    calib_samples: int | None = opt(stage=SETTINGS, metavar="N", help="Use the first N calibration samples.")
    batch: int = opt(8, stage=SETTINGS, metavar="B", help="Calibration batch size.")
    providers: tuple[str, ...] = opt(("cpu",), stage=SETTINGS, parse="providers", metavar="LIST",
                                     help="onnxruntime execution providers for calibration, e.g. cuda,cpu.")
    verify: bool = opt(True, stage=SETTINGS, kind="negated", flag="--no-verify",
                       help="Skip the onnxruntime comparison with the dense model.")
    seed: int = opt(0, stage=SETTINGS, metavar="N", help="Seed of the random inputs.")
    # per invocation
    force: bool = opt(False, stage=RUN, kind="flag",
                      help="Overwrite the output directory (one sparsec wrote).")
    quiet: bool = opt(False, stage=RUN, kind="flag", flag="-q/--quiet", help="No progress bar.")

    @property
    def transformer(self) -> bool:
        return (self.heads is not None or self.heads_per_layer is not None or self.ffn is not None
                or self.tokens is not None)

    @property
    def structured(self) -> bool:
        return self.channels is not None or self.transformer

    @property
    def folds_bn(self) -> bool:
        return self.channels is not None if self.fold_bn is None else self.fold_bn

    @property
    def prunes_weights(self) -> bool:
        """False for a compile that only folds BatchNorm (--fold-bn without --nm/--sparsity)."""
        return self.nm is not None or self.sparsity is not None

    @property
    def calibrated(self) -> bool:
        return self.calib is not None or self.calib_random is not None

    def __post_init__(self) -> None:
        if self.nm is not None and (self.channels is not None or self.ffn is not None) and self.round_to == 1:
            object.__setattr__(self, "round_to", self.nm.m)  # kept widths stay N:M-able for the weights stage
        self._check_pattern()
        self._check_calibration()

    def _check_calibration(self) -> None:
        if self.calib is not None and self.calib_random is not None:
            raise SparsecError("--calib and --calib-random are exclusive", "choose one data source")
        for flag, value in (("--calib-random", self.calib_random), ("--calib-samples", self.calib_samples),
                            ("--batch", self.batch), ("--block-size", self.block_size)):
            if value is not None and value < 1:
                raise SparsecError(f"{flag} {value} must be at least 1")
        needs = [f"--method {self.method}"] if self.method in CALIBRATED and self.prunes_weights else []
        needs += ["--owl"] if self.owl else []
        needs += ["--sequential"] if self.sequential else []
        if needs and not self.calibrated:
            raise SparsecError(f"{' and '.join(needs)} needs calibration data",
                               "give --calib FILE.npz|DIR or --calib-random N")
        if self.owl and self.nm is not None:
            raise SparsecError("--owl sets a sparsity per layer; it works with --sparsity, not --nm")
        if not 0.0 < self.damp < 1.0:
            raise SparsecError(f"--damp {self.damp} is out of range", "use 0 < damp < 1, e.g. 0.01")
        if not 0.0 <= self.owl_lambda < 0.5:
            raise SparsecError(f"--owl-lambda {self.owl_lambda} is out of range", "use 0 <= λ < 0.5")
        if self.owl_m <= 0:
            raise SparsecError(f"--owl-m {self.owl_m} must be positive")

    def _check_transformer(self) -> None:
        for flag, value in (("--heads", self.heads), ("--ffn", self.ffn)):
            if value is not None and not 0.0 <= value < 1.0:
                raise SparsecError(f"{flag} {value} is out of range", "use 0 <= R < 1")
        if self.tokens is not None and not 0.0 < self.tokens <= 1.0:
            raise SparsecError(f"--tokens {self.tokens} is out of range", "use 0 < KEEP <= 1, e.g. 0.7")
        if self.tokens_from < 1:
            raise SparsecError(f"--tokens-from {self.tokens_from} must be at least 1")
        if self.heads_per_layer is not None and self.heads_per_layer < 1:
            raise SparsecError(f"--heads-per-layer {self.heads_per_layer} must be at least 1")
        if self.heads is not None and self.heads_per_layer is not None:
            raise SparsecError("--heads and --heads-per-layer are exclusive", "choose one")
        if self.channels is not None:
            raise SparsecError("--channels and --heads/--ffn/--tokens are exclusive",
                               "in a transformer --ffn removes the removable channels; use --ffn R")

    def _check_channels(self) -> None:
        if self.transformer:
            self._check_transformer()
            return
        if self.channels is None:
            if self.recover:
                raise SparsecError("--recover refits layers after --channels; give --channels R")
            return
        if not 0.0 <= self.channels < 1.0:
            raise SparsecError(f"--channels {self.channels} is out of range",
                               "use 0 <= R < 1: the fraction of prunable channels to remove")
        if not 0.0 < self.channels_per_layer_max <= 1.0:
            raise SparsecError(f"--channels-per-layer-max {self.channels_per_layer_max} is out of range",
                               "use 0 < max <= 1")
        if self.channel_score not in ("l1", "l2", "bn", "act"):
            raise SparsecError(f"--channel-score {self.channel_score!r} is unknown",
                               "choose l1, l2, bn or act")
        if self.round_to < 1:
            raise SparsecError(f"--round-to {self.round_to} must be at least 1")
        if (self.channel_score == "act" or self.recover) and not self.calibrated:
            raise SparsecError("--channel-score act and --recover need calibration data",
                               "give --calib FILE.npz|DIR or --calib-random N")

    def _check_encoding(self) -> None:
        if self.encode not in ("auto", "none", *FORMATS):
            raise SparsecError(f"--encode {self.encode!r} is unknown",
                               f"choose auto, none or one of {', '.join(FORMATS)}")
        if not 1 <= self.rle_bits <= 16:
            raise SparsecError(f"--rle-bits {self.rle_bits} is out of range", "use 1..16, e.g. 4")
        if self.sparse_initializers and not self.prunes_weights:
            raise SparsecError("--sparse-initializers stores pruned weights; structured pruning leaves "
                               "none", "use it with --nm or --sparsity")

    def _check_pattern(self) -> None:
        self._check_encoding()
        self._check_channels()
        if self.nm is None and self.sparsity is None and not self.fold_bn and not self.structured:
            raise SparsecError("nothing to do: give --nm N:M, --sparsity S, --channels R or --fold-bn")
        if self.nm is not None and self.sparsity is not None:
            raise SparsecError("--nm and --sparsity are exclusive", "choose one pattern")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise SparsecError(f"--sparsity {self.sparsity} is out of range", "use 0 <= S < 1")
        if self.method not in METHODS:
            raise SparsecError(f"--method {self.method!r} is not available",
                               f"choose one of {', '.join(METHODS)}")
        if self.group not in GROUPS:
            raise SparsecError(f"--group {self.group!r} is unknown", f"choose one of {', '.join(GROUPS)}")
        if self.precision not in PRECISIONS:
            raise SparsecError(f"--precision {self.precision!r} is unknown",
                               f"choose one of {', '.join(PRECISIONS)}")
        if self.seed < 0:
            raise SparsecError(f"--seed {self.seed} is negative", "use a seed >= 0")
        if self.min_params < 0:
            raise SparsecError(f"--min-params {self.min_params} is negative")
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SparsecError(f"{flag} {pattern!r} is not a valid regex: {exc}") from None

    def as_dict(self) -> dict:
        """Every option as applied (report.json's `options`), per-invocation ones left out."""
        return {f.name: self.value_of(f.name) for f in fields(self) if f.metadata["stage"] != RUN}

    def value_of(self, name: str) -> Any:
        """One option's value as plain data (strings, numbers, lists), as report.json and recipe files
        write it."""
        value = self.folds_bn if name == "fold_bn" else getattr(self, name)
        if isinstance(value, NMPattern):
            return str(value)
        if isinstance(value, dict):
            return {k: list(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return list(value)
        if name == "calib" and value is not None:
            return str(value) if isinstance(value, str | Path) else type(value).__name__
        return value


def declared(stage: str | None = None) -> list:
    """The declared option fields, all of them or one stage's, in declaration order."""
    return [f for f in fields(CompileOptions) if stage is None or f.metadata["stage"] == stage]

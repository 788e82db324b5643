"""Compile options as frozen data: one typed, validated options class per recipe stage.

Each recipe (weights, channels, fold-bn, transformer, precision, encode) declares its own frozen
dataclass below, with its fields (`opt(...)`: default, help, how the CLI spells it) and its own checks
in `__post_init__`; the shared settings and the per-invocation options are two more. CompileOptions,
the flat view that the CLI, the API keywords, recipe files and report.json read, is generated from
these classes' fields (no option is spelled twice) and holds one instance per recipe (`of(stage)`);
the rules that span recipes live in one place, `_Compile.__post_init__`."""

from __future__ import annotations

import enum
import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, ClassVar

from sparsec.errors import SparsecError


class Choice(str, enum.Enum):
    """A choice option's value: equal to its string, printed and JSON-encoded as it (Python 3.10's
    str-mixin enum; recipe files and report.json write `.value`)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)

    @classmethod
    def parse(cls, value: Any, flag: str) -> Choice:
        """The member named by `value`, or a one-line error naming the flag and the choices."""
        try:
            return cls(value.value if isinstance(value, Choice) else value)
        except ValueError:
            raise SparsecError(f"{flag} {value!r} is unknown", f"choose one of {', '.join(cls.values())}"
                               ) from None


class Method(Choice):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"  # |W|·‖X‖
    SPARSEGPT = "sparsegpt"  # second order, with weight update


class Group(Choice):  # where N:M and magnitude scores compare
    OUTPUT = "output"
    LAYER = "layer"
    INPUT = "input"


class Precision(Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class ChannelScore(Choice):
    L1 = "l1"
    L2 = "l2"
    BN = "bn"  # BatchNorm |gamma|
    ACT = "act"  # calibrated activation x outgoing weights


class EncodeFormat(Choice):  # auto: the smallest codec per tensor; none: no weights.sparsec
    AUTO = "auto"
    NONE = "none"
    DENSE = "dense"
    BITMAP = "bitmap"
    RLE = "rle"
    COO = "coo"
    CSR = "csr"
    CSC = "csc"
    NM_HW = "nm_hw"
    NM_RANK = "nm_rank"


METHODS = Method.values()
ROUND_TO = 8  # kept channel counts' default multiple (--round-to)
CALIBRATED = (Method.WANDA.value, Method.SPARSEGPT.value)
BIAS_CORRECTED = (Method.MAGNITUDE.value, Method.WANDA.value)  # bias correction's default (with calibration)
PRECISIONS = Precision.values()
GROUPS = Group.values()
FORMATS = EncodeFormat.values()[2:]  # --encode's codecs (without auto and none)


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


def opt(default: Any = None, *, help: str, factory: Any = None, **cli: Any) -> Any:
    """A declared option: its default, its help text and how the CLI spells it (`flag`, `metavar`,
    `choices`: a Choice enum, `kind`: value | flag | pair | multi, `parse`: a value parser's name in
    sparsec.recipes.PARSERS). Its stage is the recipe class that declares it. The CLI options, the API
    keywords, the recipe file keys and `as_dict` are all generated from these fields."""
    meta = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(spec) -> str:
    """The CLI flag of a declared field (errors name it; the API's wording turns it into `name=`)."""
    return (spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")).split("/")[-1]


class StageOptions:
    """Base of the recipe option classes: parses the choice fields into their enums."""

    stage: ClassVar[str]

    def __post_init__(self) -> None:
        for spec in fields(self):  # type: ignore[arg-type]
            choices = spec.metadata.get("choices")
            if choices is not None and getattr(self, spec.name) is not None:  # None: resolved later
                object.__setattr__(self, spec.name, choices.parse(getattr(self, spec.name), flag_of(spec)))
        self.check()

    def check(self) -> None:
        """The recipe's own rules (one-line errors naming the flag)."""


def _at_least(pairs, low: int) -> None:
    for flag, value in pairs:
        if value is not None and value < low:
            raise SparsecError(f"{flag} {value} must be at least {low}")


@dataclass(frozen=True)
class WeightsOptions(StageOptions):
    """weights: N:M / unstructured sparsity of the remaining weights."""

    stage: ClassVar[str] = "weights"
    nm: NMPattern | None = opt(metavar="N:M", parse="nm",
                               help="N:M pattern along the reduction axis, e.g. 2:4 or 4:8.")
    sparsity: float | None = opt(metavar="S", help="Unstructured sparsity in [0, 1).")
    method: Method | None = opt(  # None: sparsegpt with calibration data, else magnitude (_Compile)
        choices=Method, help="Weight score: magnitude, wanda (|W|·‖X‖) or sparsegpt (second order with "
                             "weight update); wanda and sparsegpt need calibration (default: sparsegpt "
                             "with calibration data, else magnitude).")
    group: Group = opt(Group.OUTPUT, choices=Group, help="Comparison group for unstructured pruning.")
    include: str | None = opt(metavar="REGEX", help="Prune only layers whose node name matches.")
    exclude: str | None = opt(metavar="REGEX", help="Leave layers whose node name matches dense.")
    nm_everywhere: bool = opt(False, kind="flag",
                              help="Apply N:M also where TensorRT cannot use it (grouped/depthwise conv).")
    min_params: int = opt(256, metavar="N", help="Leave layers with fewer weights dense.")
    sequential: bool = opt(False, kind="flag",
                           help="Calibrate level by level with earlier layers already pruned.")
    damp: float = opt(0.01, metavar="F",
                      help="SparseGPT damping, as a fraction of the mean Hessian diagonal.")
    block_size: int = opt(128, metavar="N", help="SparseGPT block size.")
    owl: bool = opt(False, kind="flag", help="Outlier-weighed layerwise sparsity (unstructured only).")
    owl_lambda: float = opt(0.08, metavar="L", help="OWL: layer sparsities stay within S ± L.")
    owl_m: float = opt(5.0, metavar="M", help="OWL: a score above M times its layer's mean is an outlier.")
    prune_lm_head: bool = opt(False, kind="flag",
                              help="Prune a language model's LM head too (the layer writing the logits).")
    permute: bool = opt(False, kind="flag",
                        help="Before N:M masks are chosen, reorder coupled channels so that each M-group "
                             "keeps more score (the function is unchanged).")
    min_similarity: float | None = opt(
        metavar="F", help="Quality floor: prune only the layers (chosen by MACs saved per measured "
                          "sensitivity) that keep the output cosine similarity on held-back calibration "
                          "samples (the last quarter) at or above F, e.g. 0.99 (needs calibration).")

    @property
    def prunes_weights(self) -> bool:
        return self.nm is not None or self.sparsity is not None

    @property
    def calibrated_method(self) -> bool:
        return self.method in CALIBRATED

    def check(self) -> None:
        if self.nm is not None and self.sparsity is not None:
            raise SparsecError("--nm and --sparsity are exclusive", "choose one pattern")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise SparsecError(f"--sparsity {self.sparsity} is out of range", "use 0 <= S < 1")
        if self.min_params < 0:
            raise SparsecError(f"--min-params {self.min_params} is negative")
        _at_least((("--block-size", self.block_size),), 1)
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SparsecError(f"{flag} {pattern!r} is not a valid regex: {exc}") from None
        if self.owl and self.nm is not None:
            raise SparsecError("--owl sets a sparsity per layer; it works with --sparsity, not --nm")
        if self.permute and self.nm is None:
            raise SparsecError("--permute reorders channels for N:M groups, so it works with --nm only",
                               "use --nm 2:4, or drop --permute")
        if self.min_similarity is not None and not 0.0 < self.min_similarity <= 1.0:
            raise SparsecError(f"--min-similarity {self.min_similarity} is out of range",
                               "use 0 < F <= 1, e.g. 0.99")
        if not 0.0 < self.damp < 1.0:
            raise SparsecError(f"--damp {self.damp} is out of range", "use 0 < damp < 1, e.g. 0.01")
        if not 0.0 <= self.owl_lambda < 0.5:
            raise SparsecError(f"--owl-lambda {self.owl_lambda} is out of range", "use 0 <= λ < 0.5")
        if self.owl_m <= 0:
            raise SparsecError(f"--owl-m {self.owl_m} must be positive")


@dataclass(frozen=True)
class ChannelsOptions(StageOptions):
    """channels: structured removal of whole channels."""

    stage: ClassVar[str] = "channels"
    channels: float | None = opt(metavar="R",
                                 help="Remove this fraction of the prunable channels (global ranking).")
    channels_per_layer_max: float = opt(1.0, metavar="F",
                                        help="At most this fraction of any one layer's channels goes.")
    channel_score: ChannelScore | None = opt(  # None: act with calibration data, else l1 (_Compile)
        choices=ChannelScore, help="Channel importance: filter norms, BatchNorm |gamma|, or calibrated "
                                   "activation x outgoing weights (default: act with calibration data, "
                                   "else l1).")
    round_to: int | None = opt(  # None: ROUND_TO, a multiple of M with --nm (_Compile)
        metavar="K", help=f"Kept channel counts stay multiples of K (default {ROUND_TO}, or a multiple of M "
                          "with --nm: the widths onnxruntime's and TensorRT's fast kernels keep; 1 for "
                          "exact counts).")
    recover: bool | None = opt(kind="pair",  # None: on with calibration data (_Compile)
                               help="Refit consumers on the kept channels by least squares (needs "
                                    "calibration; default: on with calibration data).")

    def check(self) -> None:
        if self.recover and self.channels is None:
            raise SparsecError("--recover refits layers after --channels; give --channels R")
        if self.channels is not None and not 0.0 <= self.channels < 1.0:
            raise SparsecError(f"--channels {self.channels} is out of range",
                               "use 0 <= R < 1: the fraction of prunable channels to remove")
        if not 0.0 < self.channels_per_layer_max <= 1.0:
            raise SparsecError(f"--channels-per-layer-max {self.channels_per_layer_max} is out of range",
                               "use 0 < max <= 1")
        _at_least((("--round-to", self.round_to),), 1)


@dataclass(frozen=True)
class FoldBNOptions(StageOptions):
    """fold-bn: BatchNormalization folded into the preceding layer."""

    stage: ClassVar[str] = "fold-bn"
    fold_bn: bool | None = opt(kind="pair",  # None: on with --channels, else off (CompileOptions.folds_bn)
                               help="Fold BatchNormalization into the preceding layer (default: on with "
                                    "--channels; before --nm/--sparsity; alone, a fold-only compile).")


@dataclass(frozen=True)
class TransformerOptions(StageOptions):
    """transformer: attention heads, FFN neurons, tokens."""

    stage: ClassVar[str] = "transformer"
    heads: float | None = opt(metavar="R", help="Remove this fraction of attention heads (global ranking, "
                                                "one kept per layer).")
    heads_per_layer: int | None = opt(metavar="N", help="Keep exactly N heads in every layer.")
    ffn: float | None = opt(metavar="R", help="Remove this fraction of FFN neurons.")
    tokens: float | None = opt(metavar="KEEP",
                               help="Token pruning: later layers keep the top ceil(KEEP*L) tokens plus the "
                                    "first.")
    tokens_from: int = opt(1, metavar="LAYER",
                           help="Score tokens with this layer's attention (1-based); later layers run "
                                "pruned.")

    @property
    def runs(self) -> bool:
        return any(v is not None for v in (self.heads, self.heads_per_layer, self.ffn, self.tokens))

    def check(self) -> None:
        for flag, value in (("--heads", self.heads), ("--ffn", self.ffn)):
            if value is not None and not 0.0 <= value < 1.0:
                raise SparsecError(f"{flag} {value} is out of range", "use 0 <= R < 1")
        if self.tokens is not None and not 0.0 < self.tokens <= 1.0:
            raise SparsecError(f"--tokens {self.tokens} is out of range", "use 0 < KEEP <= 1, e.g. 0.7")
        _at_least((("--tokens-from", self.tokens_from), ("--heads-per-layer", self.heads_per_layer)), 1)
        if self.heads is not None and self.heads_per_layer is not None:
            raise SparsecError("--heads and --heads-per-layer are exclusive", "choose one")


@dataclass(frozen=True)
class CorrectOptions(StageOptions):
    """correct: error correction after pruning, measured on the calibration data."""

    stage: ClassVar[str] = "correct"
    bias_correct: bool | None = opt(kind="pair",  # None: on with calibration data for magnitude and wanda
                                    help="Fold each pruned layer's output-mean shift against the dense model "
                                         "into its bias, level by level (needs calibration; default: on "
                                         "with calibration data for magnitude and wanda).")
    bn_reestimate: bool = opt(False, kind="pair",
                              help="Re-estimate unfused BatchNorm statistics on the pruned model; match "
                                   "mean and deviation of producers a BatchNorm was folded into (needs "
                                   "calibration).")

    correct_samples: int = opt(64, metavar="N",
                               help="Measure on the first N calibration samples only (one pass per depth "
                                    "level: the stage's cost grows with N).")

    def check(self) -> None:
        _at_least([("--correct-samples", self.correct_samples)], 1)


@dataclass(frozen=True)
class PrecisionOptions(StageOptions):
    """precision: fp16/bf16 conversion of the output model."""

    stage: ClassVar[str] = "precision"
    precision: Precision = opt(Precision.FP32, choices=Precision,
                               help="Convert the output model (TensorRT's sparse kernels need fp16/bf16).")


@dataclass(frozen=True)
class EncodeOptions(StageOptions):
    """encode: blob encoding of the pruned weights (weights.sparsec)."""

    stage: ClassVar[str] = "encode"
    encode: EncodeFormat = opt(EncodeFormat.AUTO, choices=EncodeFormat,
                               help="Blob encoding of pruned weights in weights.sparsec (auto: smallest per "
                                    "tensor).")
    rle_bits: int = opt(4, metavar="B", help="Run-length field width in bits.")
    sparse_initializers: bool = opt(False, kind="flag",
                                    help="Store pruned weights as ONNX sparse initializers (COO) in "
                                         "model.onnx.")

    def check(self) -> None:
        if not 1 <= self.rle_bits <= 16:
            raise SparsecError(f"--rle-bits {self.rle_bits} is out of range", "use 1..16, e.g. 4")


@dataclass(frozen=True)
class SettingsOptions(StageOptions):
    """Settings shared by every stage: shapes, calibration data, seed, verification."""

    stage: ClassVar[str] = SETTINGS
    shapes: dict[str, tuple[int, ...]] = opt(
        factory=dict, flag="--shape", kind="multi", parse="shapes", metavar="NAME=d0,d1|NAME:d0xd1",
        help="Fix an input's symbolic dims for verification and MAC counts (repeatable).")
    calib: Any = opt(metavar="FILE.npz|DIR", parse="path",  # or a reader with get_next()
                     help="Calibration data: arrays keyed by input name, axis 0 = samples.")
    calib_random: int | None = opt(metavar="N", help="Draw N calibration samples from the input spec.")
    calib_range: dict[str, tuple[float, float]] = opt(
        factory=dict, kind="multi", parse="ranges", metavar="NAME=lo,hi",
        help="Value range [lo, hi) of a random input for --calib-random and for verification without "
             "--calib, e.g. input_ids=0,30522 (repeatable).")
    calib_samples: int | None = opt(metavar="N", help="Use the first N calibration samples.")
    batch: int = opt(8, metavar="B", help="Calibration batch size.")
    # providers stay strings: onnxruntime's set depends on the build (resolve_providers checks them)
    providers: tuple[str, ...] = opt(("cpu",), parse="providers", metavar="LIST",
                                     help="onnxruntime execution providers for calibration, e.g. cuda,cpu.")
    verify: bool = opt(True, kind="negated", flag="--no-verify",
                       help="Skip the onnxruntime comparison with the dense model.")
    seed: int = opt(0, metavar="N", help="Seed of the random inputs.")
    workers: int | None = opt(
        metavar="N", help="Calibrate and run SparseGPT's per-layer solves on N local Ray workers (one "
                          "onnxruntime thread each); with --ray, use at most N of the cluster's CPUs. "
                          "Needs pip install 'sparsec[ray]'.")
    ray: str | None = opt(metavar="auto|ADDRESS",
                          help="Scale out on an existing Ray cluster (after `ray start --head`; auto: the "
                               "one on this machine).")

    @property
    def calibrated(self) -> bool:
        return self.calib is not None or self.calib_random is not None

    def check(self) -> None:
        if self.calib is not None and self.calib_random is not None:
            raise SparsecError("--calib and --calib-random are exclusive", "choose one data source")
        _at_least((("--calib-random", self.calib_random), ("--calib-samples", self.calib_samples),
                   ("--batch", self.batch), ("--workers", self.workers)), 1)
        if self.seed < 0:
            raise SparsecError(f"--seed {self.seed} is negative", "use a seed >= 0")


@dataclass(frozen=True)
class RunOptions(StageOptions):
    """Per invocation: never written to a recipe file."""

    stage: ClassVar[str] = RUN
    force: bool = opt(False, kind="flag", help="Overwrite the output directory (one sparsec wrote).")
    quiet: bool = opt(False, kind="flag", flag="-q/--quiet", help="No progress bar.")


# in declaration order (as --help and the docstring list them); recipes.ORDER fixes the run order
RECIPE_OPTIONS: tuple[type[StageOptions], ...] = (
    WeightsOptions, ChannelsOptions, FoldBNOptions, TransformerOptions, CorrectOptions, PrecisionOptions,
    EncodeOptions, SettingsOptions, RunOptions)


class _Compile:
    """The flat view's behaviour: one instance per recipe, and the rules that span recipes."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_defaulted", self._data_defaults())
        parts = {}
        for cls in RECIPE_OPTIONS:
            part = cls(**{f.name: getattr(self, f.name) for f in fields(cls)})
            for f in fields(cls):  # the parsed values (enums) in the flat view too
                object.__setattr__(self, f.name, getattr(part, f.name))
            parts[cls.stage] = part
        object.__setattr__(self, "_parts", parts)
        self._check_across()

    @staticmethod
    def round_to_for(asked: int | None, nm: NMPattern | None) -> int:
        """--round-to as asked, else ROUND_TO (bench/RESULTS.md, "Channel defaults": at 1 the kept odd
        widths ran slower than dense); with --nm a multiple of M, so kept widths stay N:M-able."""
        k = ROUND_TO if asked is None else asked
        return math.lcm(k, nm.m) if nm is not None and (asked is None or asked == 1) else k

    def _data_defaults(self) -> dict[str, str]:
        """Resolve --method, --channel-score and --recover left unset from the measurements
        (bench/RESULTS.md, "Channel defaults" and the quality tables): with calibration data SparseGPT,
        act scores and the refit, else magnitude and l1 without; returns what was resolved and why
        (the weights and channels steps' reports say it was a default)."""
        resolved = {}
        calibrated = self.calib is not None or self.calib_random is not None  # before the parts exist
        data = "calibration data given" if calibrated else "no calibration data"
        round_to = self.round_to_for(self.round_to, self.nm)
        if self.round_to is None and (self.channels is not None or self.ffn is not None):
            resolved["round_to"] = f"{round_to} (default: widths fast kernels keep; --round-to 1: exact)"
        object.__setattr__(self, "round_to", round_to)
        if self.method is None:
            object.__setattr__(self, "method", Method.SPARSEGPT if calibrated else Method.MAGNITUDE)
            if self.nm is not None or self.sparsity is not None:
                resolved["method"] = f"{self.method} (default: {data})"
        if self.channel_score is None:
            object.__setattr__(self, "channel_score", ChannelScore.ACT if calibrated else ChannelScore.L1)
            resolved["channel_score"] = f"{self.channel_score} (default: {data})"
        if self.recover is None:
            object.__setattr__(self, "recover", calibrated and self.channels is not None)
            if self.channels is not None:
                resolved["recover"] = f"{'on' if self.recover else 'off'} (default: {data})"
        return resolved

    @property
    def channel_defaults(self) -> dict[str, str]:
        """The channels options resolved from the data rather than given (e.g. {"recover": "on
        (default: calibration data given)"})."""
        return {k: v for k, v in self._defaulted.items() if k != "method"}

    @property
    def weight_defaults(self) -> dict[str, str]:
        """The weights options resolved from the data (e.g. {"method": "sparsegpt (default: ...)"})."""
        return {k: v for k, v in self._defaulted.items() if k == "method"}

    def of(self, stage: str) -> Any:
        """The options object of one recipe stage (or SETTINGS / RUN): only its own fields."""
        return self._parts[stage]

    def ffn_channels(self) -> ChannelsOptions:
        """--ffn is the transformer's channel removal: its ratio, shaped by the channels stage's
        --round-to and --channels-per-layer-max (the one option input a stage takes from another)."""
        return ChannelsOptions(channels=self.ffn, channels_per_layer_max=self.channels_per_layer_max,
                               round_to=self.round_to)

    @property
    def transformer(self) -> bool:
        return self.of("transformer").runs

    @property
    def structured(self) -> bool:
        return self.channels is not None or self.transformer

    @property
    def corrects(self) -> bool:
        return self.bias_corrects or self.bn_reestimate

    @property
    def bias_corrects(self) -> bool:
        """--bias-correct as asked, else on where calibration data is given for magnitude and wanda (its
        gain for sparsegpt, whose weight update already keeps the mean, is within noise)."""
        if self.bias_correct is not None:
            return self.bias_correct
        return self.calibrated and self.prunes_weights and self.method in BIAS_CORRECTED

    @property
    def folds_bn(self) -> bool:
        return self.channels is not None if self.fold_bn is None else self.fold_bn

    @property
    def prunes_weights(self) -> bool:
        """False for a compile that only folds BatchNorm (--fold-bn without --nm/--sparsity)."""
        return self.of("weights").prunes_weights

    @property
    def calibrated(self) -> bool:
        return self.of(SETTINGS).calibrated

    def _check_across(self) -> None:
        """Rules between recipes: exclusive stages, what needs calibration, something to do."""
        if self.transformer and self.channels is not None:
            raise SparsecError("--channels and --heads/--ffn/--tokens are exclusive",
                               "in a transformer --ffn removes the removable channels; use --ffn R")
        if not self.prunes_weights and not self.fold_bn and not self.structured:
            raise SparsecError("nothing to do: give --nm N:M, --sparsity S, --channels R or --fold-bn")
        needs = [f"--method {self.method}"] if self.method in CALIBRATED and self.prunes_weights else []
        needs += ["--owl"] if self.owl else []
        needs += ["--sequential"] if self.sequential else []
        needs += ["--bias-correct"] if self.bias_correct else []
        needs += ["--bn-reestimate"] if self.bn_reestimate else []
        needs += ["--min-similarity"] if self.min_similarity is not None else []
        if needs and not self.calibrated:
            raise SparsecError(f"{' and '.join(needs)} needs calibration data",
                               "give --calib FILE.npz|DIR or --calib-random N")
        act = self.channel_score == "act" or self.recover
        if self.channels is not None and act and not self.calibrated:
            raise SparsecError("--channel-score act and --recover need calibration data",
                               "give --calib FILE.npz|DIR or --calib-random N")
        if self.min_similarity is not None and not self.prunes_weights:
            raise SparsecError("--min-similarity chooses which layers --nm/--sparsity prune",
                               "give --nm N:M or --sparsity S (channel ratios are not chosen by it)")
        if self.sparse_initializers and not self.prunes_weights:
            raise SparsecError("--sparse-initializers stores pruned weights; structured pruning leaves "
                               "none", "use it with --nm or --sparsity")

    def as_dict(self) -> dict:
        """Every option as applied (report.json's `options`), per-invocation ones left out."""
        return {f.name: self.value_of(f.name) for f in declared() if f.metadata["stage"] != RUN}

    def value_of(self, name: str) -> Any:
        """One option's value as plain data (strings, numbers, lists), as report.json and recipe files
        write it."""
        value = {"fold_bn": self.folds_bn, "bias_correct": self.bias_corrects}[name] \
            if name in ("fold_bn", "bias_correct") else getattr(self, name)
        if isinstance(value, NMPattern | Choice):
            return str(value)
        if isinstance(value, dict):
            return {k: list(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return list(value)
        if name == "calib" and value is not None:
            return str(value) if isinstance(value, str | Path) else type(value).__name__
        return value


def _flat_fields() -> list[tuple[str, Any, Any]]:
    """The recipe classes' fields, each tagged with its stage: CompileOptions' fields."""
    flat = []
    for cls in RECIPE_OPTIONS:
        for f in fields(cls):
            meta = {**f.metadata, "stage": cls.stage}
            spec = field(default_factory=f.default_factory, metadata=meta) \
                if f.default_factory is not MISSING else field(default=f.default, metadata=meta)
            flat.append((f.name, f.type, spec))
    return flat


CompileOptions = make_dataclass("CompileOptions", _flat_fields(), bases=(_Compile,), frozen=True)
CompileOptions.__module__ = __name__
CompileOptions.__doc__ = ("Everything `sparsec compile` can be asked to do, flat (generated from the recipe "
                          "option classes; `of(stage)` gives one recipe's options object).")


def declared(stage: str | None = None) -> list:
    """The declared option fields, all of them or one stage's, in declaration order."""
    return [f for f in fields(CompileOptions) if stage is None or f.metadata["stage"] == stage]

"""Compile options as frozen data, validated once with errors that name the option."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class CompileOptions:
    """Everything `sparsec compile` can be asked to do."""

    nm: NMPattern | None = None
    sparsity: float | None = None
    method: str = "magnitude"
    group: str = "output"
    include: str | None = None
    exclude: str | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    verify: bool = True
    force: bool = False
    seed: int = 0
    nm_everywhere: bool = False
    min_params: int = 256
    precision: str = "fp32"
    calib: Any = None  # a .npz file, a directory, or a reader with get_next()
    calib_random: int | None = None
    calib_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    calib_samples: int | None = None
    batch: int = 8
    providers: tuple[str, ...] = ("cpu",)
    quiet: bool = False
    sequential: bool = False
    damp: float = 0.01
    block_size: int = 128
    owl: bool = False
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    channels: float | None = None
    channels_per_layer_max: float = 1.0
    channel_score: str = "l1"
    round_to: int = 1
    fold_bn: bool | None = None  # None: on for --channels, off for weight pruning
    recover: bool = False
    heads: float | None = None
    heads_per_layer: int | None = None
    ffn: float | None = None
    tokens: float | None = None
    tokens_from: int = 1
    encode: str = "auto"  # auto | a format | none
    rle_bits: int = 4
    sparse_initializers: bool = False

    @property
    def transformer(self) -> bool:
        return (self.heads is not None or self.heads_per_layer is not None or self.ffn is not None
                or self.tokens is not None)

    @property
    def structured(self) -> bool:
        return self.channels is not None or self.transformer

    @property
    def folds_bn(self) -> bool:
        return self.structured if self.fold_bn is None else self.fold_bn

    @property
    def prunes_weights(self) -> bool:
        """False for a compile that only folds BatchNorm (--fold-bn without --nm/--sparsity)."""
        return self.nm is not None or self.sparsity is not None

    @property
    def calibrated(self) -> bool:
        return self.calib is not None or self.calib_random is not None

    def __post_init__(self) -> None:
        self._check_pattern()
        self._check_calibration()

    def _check_calibration(self) -> None:
        if self.calib is not None and self.calib_random is not None:
            raise SparsecError("--calib and --calib-random are exclusive", "choose one data source")
        for flag, value in (("--calib-random", self.calib_random), ("--calib-samples", self.calib_samples),
                            ("--batch", self.batch), ("--block-size", self.block_size)):
            if value is not None and value < 1:
                raise SparsecError(f"{flag} {value} must be at least 1")
        needs = [f"--method {self.method}"] if self.method in CALIBRATED and not self.structured else []
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
        if self.nm is not None or self.sparsity is not None or self.channels is not None:
            raise SparsecError("--heads/--ffn cannot be combined with --nm, --sparsity or --channels",
                               "compile twice: first --heads/--ffn, then the other on the result")

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
        if self.nm is not None or self.sparsity is not None:
            raise SparsecError("--channels cannot be combined with --nm or --sparsity in one run",
                               "compile twice: first --channels, then --nm on the result")
        if (self.channel_score == "act" or self.recover) and not self.calibrated:
            raise SparsecError("--channel-score act and --recover need calibration data",
                               "give --calib FILE.npz|DIR or --calib-random N")

    def _check_encoding(self) -> None:
        if self.encode not in ("auto", "none", *FORMATS):
            raise SparsecError(f"--encode {self.encode!r} is unknown",
                               f"choose auto, none or one of {', '.join(FORMATS)}")
        if not 1 <= self.rle_bits <= 16:
            raise SparsecError(f"--rle-bits {self.rle_bits} is out of range", "use 1..16, e.g. 4")
        if self.sparse_initializers and self.structured:
            raise SparsecError("--sparse-initializers stores pruned weights; structured pruning leaves "
                               "none", "use it with --nm or --sparsity")

    def _check_pattern(self) -> None:
        self._check_encoding()
        self._check_channels()
        if self.structured:
            return
        if self.nm is None and self.sparsity is None and not self.fold_bn:
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
        return {
            "nm": str(self.nm) if self.nm else None,
            "sparsity": self.sparsity,
            "method": self.method,
            "group": self.group,
            "include": self.include,
            "exclude": self.exclude,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "verify": self.verify,
            "seed": self.seed,
            "nm_everywhere": self.nm_everywhere,
            "min_params": self.min_params,
            "precision": self.precision,
            "calib": None if self.calib is None else (
                str(self.calib) if isinstance(self.calib, str | Path) else type(self.calib).__name__),
            "calib_random": self.calib_random,
            "calib_range": {k: list(v) for k, v in self.calib_range.items()},
            "calib_samples": self.calib_samples,
            "batch": self.batch,
            "providers": list(self.providers),
            "sequential": self.sequential,
            "damp": self.damp,
            "block_size": self.block_size,
            "owl": self.owl,
            "owl_lambda": self.owl_lambda,
            "owl_m": self.owl_m,
            "channels": self.channels,
            "channels_per_layer_max": self.channels_per_layer_max,
            "channel_score": self.channel_score,
            "round_to": self.round_to,
            "fold_bn": self.folds_bn,
            "recover": self.recover,
            "heads": self.heads,
            "heads_per_layer": self.heads_per_layer,
            "ffn": self.ffn,
            "tokens": self.tokens,
            "tokens_from": self.tokens_from,
            "encode": self.encode,
            "rle_bits": self.rle_bits,
            "sparse_initializers": self.sparse_initializers,
        }

"""A one-line progress bar on stderr (samples/s, ETA) that stays silent in pipes, logs and --quiet runs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 24
_INTERVAL = 0.1  # seconds between redraws: a fast loop must not flood a slow terminal


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Context manager: `with Progress(n, "calibrating") as bar: bar.update(k)`.

    enabled=None draws only when the stream is a terminal, so logs and CI output stay clean.
    """

    def __init__(self, total: int, label: str, *, enabled: bool | None = None, stream: TextIO | None = None,
                 unit: str = "samples") -> None:
        self.stream = sys.stderr if stream is None else stream  # looked up late: tests swap sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                enabled = bool(isatty and isatty())
            except (ValueError, OSError):  # a closed stream
                enabled = False
        self.enabled, self.total, self.label, self.unit = enabled, max(int(total), 0), label, unit
        self.done = 0
        self._start = self._last = 0.0
        self._width = 0

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        self._last = -_INTERVAL
        if self.enabled:
            self._draw(self._start)
        return self

    def update(self, n: int = 1) -> None:
        """Count n more items; redraws at most every 0.1 s (and always on reaching the total)."""
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= _INTERVAL or self.done >= self.total:
            self._draw(now)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        """The bar as text, e.g. 'calibrating [######      ] 32/64 samples 120.5 samples/s ETA 0:01'."""
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(frac * _WIDTH)
        left = max(self.total - self.done, 0)
        eta = _clock(left / rate) if rate > 0 else "--:--"
        bar = "#" * filled + " " * (_WIDTH - filled)
        return f"{self.label} [{bar}] {self.done}/{self.total} {self.unit} {rate:.1f} {self.unit}/s ETA {eta}"

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = " " * max(self._width - len(text), 0)  # erase the tail of a longer previous line
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._width, self._last = len(text), now

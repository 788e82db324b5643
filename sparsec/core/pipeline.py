"""Passes and the pipeline that runs them in order.

A pass is a small object with a name, the context it needs, and a `run` that returns
a PassResult saying honestly whether and how it changed the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx

from sparsec.core.tensors import TensorStore
from sparsec.errors import SparsecError

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What passes share: the model being rewritten and facts gathered along the way."""

    model: onnx.ModelProto
    store: TensorStore
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassResult:
    """What one pass did: whether the model changed, and the details for the report."""

    name: str
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Pass(Protocol):
    name: str
    requires: frozenset[str]

    def run(self, ctx: PassContext) -> PassResult: ...


class PassError(SparsecError):
    """A pass failed; the message names it and the passes that ran before it."""


@dataclass
class Pipeline:
    """An ordered list of passes. Only the recipe stages (sparsec/recipes/steps.py, in ORDER) decide it."""

    passes: list[Pass]

    def run(self, ctx: PassContext) -> list[PassResult]:
        results: list[PassResult] = []
        for p in self.passes:
            missing = sorted(r for r in p.requires if r not in ctx.facts)
            if missing:
                raise PassError(f"pass {p.name} needs {', '.join(missing)}, which no earlier pass made")
            start = time.perf_counter()
            try:
                result = p.run(ctx)
            except SparsecError:
                raise
            except Exception as exc:  # a bug in a pass: name it and what ran before
                before = ", ".join(r.name for r in results) or "none"
                raise PassError(
                    f"pass {p.name} failed: {type(exc).__name__}: {exc} (passes run before: {before})"
                ) from exc
            result = PassResult(result.name, result.modified, result.details,
                                time.perf_counter() - start)
            log.info("pass %s: modified=%s in %.3fs", p.name, result.modified, result.seconds)
            results.append(result)
        return results

"""The pipeline: preconditions checked before a pass runs, failures named with what ran before."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from pass_helpers import context, mlp

from sparsec.core.pipeline import PassContext, PassError, PassResult, Pipeline
from sparsec.errors import SparsecError


@dataclass
class Step:
    name: str
    provides: str | None = None
    requires: frozenset[str] = field(default_factory=frozenset)
    fail: Exception | None = None

    def run(self, ctx: PassContext) -> PassResult:
        if self.fail is not None:
            raise self.fail
        if self.provides:
            ctx.facts[self.provides] = True
        return PassResult(self.name, self.provides is not None, {"seen": sorted(ctx.facts)})


def test_passes_run_in_order_and_see_earlier_facts():
    results = Pipeline([Step("a", "fa"), Step("b", "fb", frozenset({"fa"})), Step("c")]).run(context(mlp()))
    assert [(r.name, r.modified, r.details["seen"]) for r in results] == [
        ("a", True, ["fa"]), ("b", True, ["fa", "fb"]), ("c", False, ["fa", "fb"])]
    assert all(r.seconds >= 0.0 for r in results)


def test_missing_requirement_names_the_pass_and_the_fact_before_running_anything():
    ran = Step("first", "x")
    ctx = context(mlp())
    with pytest.raises(PassError, match=r"^pass needy needs calibration, layer_sparsity, which no earlier "
                                        r"pass made$"):
        Pipeline([ran, Step("needy", requires=frozenset({"layer_sparsity", "calibration"}))]).run(ctx)
    assert ctx.facts == {"x": True}  # the earlier pass ran; the needy one never did


def test_a_crashing_pass_is_named_with_the_passes_run_before_it():
    with pytest.raises(PassError) as err:
        Pipeline([Step("one"), Step("two"), Step("boom", fail=ZeroDivisionError("division by zero")),
                  Step("never")]).run(context(mlp()))
    assert str(err.value) == ("pass boom failed: ZeroDivisionError: division by zero "
                              "(passes run before: one, two)")
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    with pytest.raises(PassError, match=r"passes run before: none\)$"):
        Pipeline([Step("first", fail=KeyError("w"))]).run(context(mlp()))


def test_a_user_error_from_a_pass_reaches_the_user_unchanged():
    error = SparsecError("weight w of fc breaks the 2:4 pattern")
    with pytest.raises(SparsecError) as err:
        Pipeline([Step("one"), Step("check", fail=error)]).run(context(mlp()))
    assert err.value is error and not isinstance(err.value, PassError)

"""Recipe files (YAML): a list of stages with their options, plus shared settings.

    stages:
      - channels: {channels: 0.3, round_to: 8}
      - fold-bn: {}
      - weights: {nm: "2:4", method: magnitude}
    settings: {shapes: {x: [1, 3, 32, 32]}, seed: 0}

Every compile writes the recipe it ran to OUTDIR/recipe.yaml, so `--recipe OUTDIR/recipe.yaml`
reproduces it. A stage, key or option that does not apply is a one-line error naming it."""

from __future__ import annotations

from pathlib import Path

import yaml

from sparsec.core.options import SETTINGS, declared
from sparsec.errors import SparsecError

STAGE_ON = {"fold-bn": {"fold_bn": True}}  # a stage listed without options still runs
TOP_KEYS = ("stages", "settings")


def read_recipe(path: str | Path, order: tuple[str, ...]) -> dict:
    """The keyword values a recipe file sets, checked against the stages in `order`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SparsecError(f"{_flag(path)}: file not found", "check the path") from None
    except yaml.YAMLError as exc:
        raise SparsecError(f"{_flag(path)} is not valid YAML: {' '.join(str(exc).split())}") from None
    if isinstance(data, list):
        data = {"stages": data}
    if not isinstance(data, dict):
        raise SparsecError(f"{_flag(path)}: expected a list of stages or a mapping with 'stages'")
    for key in data:
        if key not in TOP_KEYS:
            raise SparsecError(f"{_flag(path)}: unknown key {key!r}", "the keys are stages and settings")
    values = _section(path, SETTINGS, data.get("settings") or {})
    last = -1
    for item in data.get("stages") or []:
        if not (isinstance(item, dict) and len(item) == 1) and not isinstance(item, str):
            raise SparsecError(f"{_flag(path)}: each stage is `- name: {{options}}`, got {item!r}")
        name, options = (item, None) if isinstance(item, str) else next(iter(item.items()))
        if name not in order:
            raise SparsecError(f"{_flag(path)}: unknown stage {name!r}", f"stages: {', '.join(order)}")
        if order.index(name) <= last:
            raise SparsecError(f"{_flag(path)}: stage {name!r} is out of order",
                               f"stages run in the order {', '.join(order)}")
        last = order.index(name)
        values |= STAGE_ON.get(name, {}) | _section(path, name, options or {})
    return values


def _flag(path: Path) -> str:
    return f"--recipe {str(path)!r}"  # quoted: the API's wording turns it into recipe='...'


def _section(path: Path, stage: str, options) -> dict:
    if not isinstance(options, dict):
        raise SparsecError(f"{_flag(path)}: the options of {stage!r} must be a mapping, got {options!r}")
    allowed = {f.name for f in declared(stage)}
    for key in options:
        if key not in allowed:
            owner = next((f.metadata["stage"] for f in declared() if f.name == key), None)
            hint = (f"it belongs to stage {owner!r}" if owner else "no such option") + \
                f"; {stage} takes {', '.join(sorted(allowed)) or 'no options'}"
            raise SparsecError(f"{_flag(path)}: option {key!r} does not apply to {stage!r}", hint)
    return dict(options)


def write_recipe(recipe: dict, path: Path) -> None:
    path.write_text("# sparsec recipe: `sparsec compile MODEL --recipe THIS_FILE` reproduces the compile\n"
                    + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None))

"""Helpers shared by the CLI and bad-input tests: run the CLI, check one-line failures."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner, Result

from sparsec.cli import cli


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args: object) -> Result:
    """Run the CLI in-process; stdout and stderr are captured separately."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def compile_cli(model: Path, *args: object) -> Result:
    """`sparsec compile MODEL ARGS...`, asserting that MODEL's bytes are untouched."""
    before = sha256(model) if model.is_file() else None
    result = invoke("compile", model, *args)
    if before is not None:
        assert model.is_file() and sha256(model) == before, "compile modified its input model"
    return result


def leftovers(out: Path) -> list[Path]:
    """Staging / backup directories that a compile into `out` could leave beside it."""
    if not out.parent.is_dir():
        return []
    return sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Non-zero exit, no traceback, exactly one non-empty stderr line starting with 'Error:'."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""
    return lines[0]


def assert_failed_cleanly(result: Result, out: Path, *needles: str) -> str:
    line = assert_one_line_error(result, *needles)
    assert not out.exists(), f"{out} was written by a failing compile"
    assert leftovers(out) == []
    return line

"""Write outputs to a temporary directory and move it into place only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sparsec.core.graph import EXTERNAL_DATA_NAME
from sparsec.errors import SparsecError

CONTAINER = "weights.sparsec"  # the encoded weights (sparsec.encoding.blobs writes both)
SKELETON = "skeleton.onnx"  # model.onnx without the encoded weights' bytes
SKELETON_DATA = "skeleton.onnx.data"  # the skeleton's external data: every tensor not in the container


def check_output_dir(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> None:
    """Fail early, before any work, when the output cannot be written.

    `protect` lists files (the input model and its data) that replacing OUTDIR must not delete.
    """
    resolved = out.resolve()
    for path in protect:
        if resolved == path.resolve().parent or resolved in path.resolve().parents:
            raise SparsecError(f"output directory {out} contains the input {path}",
                               "choose an -o outside the input's directory")
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise SparsecError(f"output directory {out} is the current directory or above it",
                           "choose a new subdirectory for -o")
    if out.exists() and not out.is_dir():
        raise SparsecError(f"output {out} exists and is not a directory", "choose another -o")
    if out.exists() and not force:
        raise SparsecError(f"output directory {out} already exists", "pass --force to overwrite it")
    if out.is_dir() and force:
        _check_ours(out)
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise SparsecError(f"cannot write {out}: {parent} is not a directory", "choose another -o")
    if not parent.exists():
        raise SparsecError(f"cannot write {out}: parent directory {parent} does not exist",
                           "create it or choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SparsecError(f"cannot write {out}: no write permission in {parent}",
                           "choose a writable -o")


def _check_ours(out: Path) -> None:
    """--force replaces only an empty directory or one sparsec wrote: a sparsec report.json and
    nothing but sparsec's outputs (an engine built beside them included); anything else is refused."""
    entries = sorted(out.iterdir())
    if not entries:
        return
    try:
        ours = "sparsec_version" in json.loads((out / "report.json").read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise SparsecError(f"--force refuses to replace {out}: it was not written by sparsec (no sparsec "
                           f"report.json; it holds {entries[0].name})",
                           "remove it yourself or choose another -o")
    known = {"model.onnx", "report.json", "recipe.yaml", CONTAINER, SKELETON, SKELETON_DATA,
             EXTERNAL_DATA_NAME}
    for entry in entries:
        if not entry.is_file() or (entry.name not in known and entry.suffix != ".engine"):
            raise SparsecError(f"--force refuses to replace {out}: {entry} was not written by sparsec",
                               "move it out or choose another -o")


@contextlib.contextmanager
def staged_dir(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on error it vanishes."""
    check_output_dir(out, force, protect)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise SparsecError(f"cannot write {out}: {exc.strerror}", "choose a writable -o") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would surprise users of the output
    try:
        yield tmp
        _replace(tmp, out)
    except SparsecError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # the staging folder is gone: name the output the user asked for instead
        exc.args = tuple(str(a).replace(str(tmp), str(out)) for a in exc.args)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)

"""Write outputs to a temporary directory and move it into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sparsec.errors import SparsecError


def check_output_dir(out: Path, force: bool) -> None:
    """Fail early, before any work, when the output cannot be written."""
    if out.exists() and not out.is_dir():
        raise SparsecError(f"output {out} exists and is not a directory", "choose another -o")
    if out.exists() and not force:
        raise SparsecError(f"output directory {out} already exists", "pass --force to overwrite it")
    parent = out.parent
    if not parent.exists():
        raise SparsecError(f"cannot write {out}: parent directory {parent} does not exist",
                           "create it or choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SparsecError(f"cannot write {out}: no write permission in {parent}",
                           "choose a writable -o")


@contextlib.contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on error it vanishes."""
    check_output_dir(out, force)
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

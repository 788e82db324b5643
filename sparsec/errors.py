"""User-facing errors: one line that says what is wrong and how to fix it."""

from __future__ import annotations

import contextvars
import copy
import functools
import re


class SparsecError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        text = message if hint is None else f"{message} ({hint})"
        super().__init__(" ".join(text.split()))


class MissingDependencyError(SparsecError):
    """An optional dependency (TensorRT, a GPU, onnxruntime-gpu) is not present."""

    exit_code = 3


# Errors name CLI flags; the Python API re-words them as keyword arguments (--force -> force=True).
# The CLI sets this for the duration of a command, so its users keep seeing flags.
CLI_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsec_cli_active", default=False)
_FLAG_KEYWORDS = {  # flags that are not `--name VALUE` <-> `name=VALUE`
    "force": "force=True", "no-verify": "verify=False", "shape": "shapes", "fold-bn": "fold_bn=True",
    "no-fold-bn": "fold_bn=False", "nm-everywhere": "nm_everywhere=True", "owl": "owl=True",
    "sequential": "sequential=True", "recover": "recover=True", "quiet": "quiet=True",
    "sparse-initializers": "sparse_initializers=True", "output": "output", "json": "as_dict()",
}
_FLAG = re.compile(r"(?<![\w-])(?:--([a-z][a-z0-9-]*)|-o)(?![\w-])( (?=[-\d'\"(A-Z])\S+)?")


def api_message(text: str) -> str:
    """`text` with every CLI flag written as the Python API's keyword argument."""
    def keyword(match: re.Match) -> str:
        flag, value = match.group(1) or "output", match.group(2)
        name = _FLAG_KEYWORDS.get(flag, flag.replace("-", "_"))
        return f"{name}={value[1:]}" if value and "=" not in name else name
    return _FLAG.sub(keyword, text)


def api_errors(fn):
    """Re-raise a SparsecError from `fn` in the API's words, unless the CLI is calling."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SparsecError as exc:
            if CLI_ACTIVE.get():
                raise
            worded = copy.copy(exc)
            worded.args = (api_message(str(exc)),)
            raise worded.with_traceback(None) from None
    return wrapper

"""User-facing errors: one line that says what is wrong and how to fix it."""


class SparsecError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        text = message if hint is None else f"{message} ({hint})"
        super().__init__(" ".join(text.split()))


class MissingDependencyError(SparsecError):
    """An optional dependency (TensorRT, a GPU, onnxruntime-gpu) is not present."""

    exit_code = 3

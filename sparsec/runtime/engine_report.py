"""`sparsec engine`: build through TensorRT and record which layers went sparse."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from sparsec.runtime.tensorrt import build_engine


def build_and_record(model: Path, engine: Path, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Build the engine; when MODEL sits in a compile OUTDIR, add `tensorrt.engine` to its report."""
    info = asdict(build_engine(str(model), str(engine), shapes=dict(shapes) or None))
    report_path = Path(model).parent / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report.setdefault("tensorrt", {})["engine"] = info
        fd, tmp = tempfile.mkstemp(prefix=".report.", dir=report_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, report_path)
    return info

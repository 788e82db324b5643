"""The long fuzz campaign: random models (tests/fuzz/generator.py) × every mode, independent checks.

    python bench/fuzz.py --seeds 1000 --start 0 [--modes nm24,channels30] [--failures DIR]

Prints cases run and failures by class (exception type + first words, or check name) and writes
each failing model to DIR/<class>/seed_<n>.onnx (the smallest per class is listed at the end).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz.checks import LONG_MODES, run_seed  # noqa: E402
from fuzz.generator import make_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--modes", default=",".join(LONG_MODES))
    ap.add_argument("--failures", default="/tmp/fuzz_failures")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every failure as it happens")
    args = ap.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in LONG_MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {', '.join(LONG_MODES)}")
    fail_dir = Path(args.failures)
    runs = collections.Counter()
    refusals = collections.Counter()
    failures: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    smallest: dict[str, tuple[int, int, str]] = {}
    notes = collections.Counter()
    t0 = time.perf_counter()
    for seed in range(args.start, args.start + args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                cases = run_seed(seed, modes, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a generator bug is reported, not hidden
                failures[("generator", type(exc).__name__)].append(seed)
                continue
        for case in cases:
            runs[case.mode] += 1
            if case.refused:
                refusals[(case.mode, _first_words(case.refused))] += 1
            for note in case.notes:
                notes[(case.mode, " ".join(note.split()[:2]))] += 1
            for cls, detail in case.failures:
                failures[(case.mode, cls)].append(seed)
                if args.verbose:
                    print(f"seed {seed} {case.mode}: {cls}: {detail}", flush=True)
                _save(fail_dir, cls, seed, detail, smallest)
    elapsed = time.perf_counter() - t0
    total = sum(runs.values())
    print(f"\n{total} cases ({args.seeds} models, seeds {args.start}..{args.start + args.seeds - 1}) "
          f"in {elapsed:.0f} s; {sum(len(v) for v in failures.values())} failures\n")
    print("| mode | cases | failures | refusals (SparsecError) |")
    print("|---|---|---|---|")
    for mode in modes:
        nf = sum(len(v) for (m, _), v in failures.items() if m == mode)
        nr = sum(v for (m, _), v in refusals.items() if m == mode)
        print(f"| {mode} | {runs[mode]} | {nf} | {nr} |")
    if failures:
        print("\n| mode | failure class | cases | first seeds |")
        print("|---|---|---|---|")
        for (mode, cls), seeds in sorted(failures.items(), key=lambda kv: -len(kv[1])):
            print(f"| {mode} | {cls} | {len(seeds)} | {', '.join(map(str, seeds[:6]))} |")
    if refusals:
        print("\n| mode | refusal | cases |")
        print("|---|---|---|")
        for (mode, text), n in refusals.most_common():
            print(f"| {mode} | {text} | {n} |")
    if notes:
        print("\n| mode | note (not a failure) | cases |")
        print("|---|---|---|")
        for (mode, text), n in notes.most_common():
            print(f"| {mode} | {text} | {n} |")
    if smallest:
        print(f"\nsmallest failing model per class (under {fail_dir}):")
        for cls, (nodes, seed, path) in sorted(smallest.items()):
            print(f"  {cls}: seed {seed}, {nodes} nodes: {path}")
    return 1 if failures else 0


def _first_words(text: str, n: int = 6) -> str:
    return " ".join(re.sub(r"'[^']*'|\d+(\.\d+)?", "…", text).split()[:n])


def _save(root: Path, cls: str, seed: int, detail: str, smallest: dict) -> None:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cls)[:60]
    folder = root / slug
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"seed_{seed}.onnx"
    if not path.exists():
        model, _ = make_model(seed)
        path.write_bytes(model.SerializeToString())
        (folder / f"seed_{seed}.txt").write_text(detail + "\n")
        nodes = sum(1 for n in model.graph.node if n.op_type != "Constant")
        if cls not in smallest or nodes < smallest[cls][0]:
            smallest[cls] = (nodes, seed, str(path))


if __name__ == "__main__":
    raise SystemExit(main())

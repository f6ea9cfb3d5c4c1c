"""Run every benchmark in bench/ and print one table: benchmark, figure, target, value, ratio, ok.

Each benchmark runs as its own subprocess (from the repository root) with ``--json`` and prints
rows ``{"name", "value", "unit", "target", "ratio", "ok"}``; ``ratio`` is value / target and ``ok``
says whether the target is met (a time or memory target is an upper bound, a quality target a lower
one). A benchmark's ``--help`` is read first: only the options it has are passed.

    python bench/run_all.py                  # full sizes (2 CPU cores: about an hour and a half)
    python bench/run_all.py --quick          # reduced sizes where a benchmark has options for them
    python bench/run_all.py --device cuda    # on a GPU machine (passed to benchmarks with --device)
    python bench/run_all.py --only lungs,noise --json

``--quick`` checks that the suite runs; its quality figures come from toy-sized training and are
not expected to meet the targets. Exit code 1 when a benchmark crashed (targets missed: still 0).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
#: the order benchmarks run in (segmentation reuses pseudo_masks' data and GAN); others follow by name
ORDER = ("preprocess", "noise", "lungs", "predict", "scaling", "pseudo_masks", "segmentation")
#: Studies that need a finished demo folder and take an hour or more: run only when named in --only.
STUDIES = ("recipes", "hysteresis", "gan_lesions", "phantom_variety")
QUICK_WORK = "bench-work/quick/pseudo_masks"
QUICK_GAN_STEPS = 30
QUICK = {  # benchmark -> (option, value) pairs for --quick (passed only when the benchmark has them)
    "lungs": [("--phantoms", "4")],
    "preprocess": [("--repeats", "1")],
    "predict": [("--repeats", "1")],
    "scaling": [("--steps", "30")],
    "pseudo_masks": [("--work", QUICK_WORK), ("--steps", str(QUICK_GAN_STEPS)), ("--train", "2"),
                     ("--test-healthy", "1"), ("--test-covid", "2"), ("--variants", "perlin")],
    "segmentation": [("--work", QUICK_WORK), ("--gan", f"gan_perlin_tiny_{QUICK_GAN_STEPS}"),
                     ("--steps", "20"), ("--archs", "transunet")],
}  # fmt: skip


def benchmarks(only: list[str] | None) -> list[str]:
    """Benchmark names (bench/<name>.py), in run order."""
    found = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "run_all" and not p.stem.startswith("_"))
    ordered = [n for n in ORDER if n in found] + [n for n in found if n not in ORDER and n not in STUDIES]
    if only:
        unknown = sorted(set(only) - set(found))
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)} (have: {', '.join(found)})")
        ordered = [n for n in ORDER if n in only] + [n for n in found if n in only and n not in ORDER]
    return ordered


def options_of(name: str) -> set[str]:
    """The long options a benchmark's --help lists."""
    result = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--help"], cwd=ROOT, capture_output=True, text=True
    )
    return set(re.findall(r"--[a-z][a-z0-9-]*", result.stdout))


def command(name: str, options: set[str], quick: bool, device: str | None) -> list[str]:
    """The command line for one benchmark: --json, the --quick sizes and --device it supports."""
    args = [sys.executable, str(BENCH / f"{name}.py")]
    if "--json" in options:
        args.append("--json")
    pairs = list(QUICK.get(name, [])) if quick else []
    if device is not None:
        pairs.append(("--device", device))
    for option, value in pairs:
        if option in options:
            args += [option, value]
    return args


def parse_rows(stdout: str) -> list[dict] | dict | None:
    """The last JSON document in `stdout` (benchmarks may print progress lines before it)."""
    lines = stdout.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i][:1] in "[{":
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


def normalise(data: list[dict] | dict) -> list[dict]:
    """Rows from a benchmark's JSON: a list of rows, or one dict of figures (bench/noise.py)."""
    if isinstance(data, list):
        return data
    if "meets_target" in data:  # noise.py: the target is on the speed-up ratio
        ratio = data.get("ratio")
        return [
            {"name": f"{data['name']}: speed-up", "value": ratio, "unit": "x", "target": data.get("target"),
             "ratio": None if ratio is None else ratio / data["target"], "ok": data.get("meets_target")},
            {"name": "  ours, CPU", "value": data.get("value"), "unit": data.get("unit", ""), "target": None,
             "ratio": None, "ok": None},
            {"name": "  speed-up with 1 torch thread (robust to other load)", "unit": "x", "target": None,
             "value": data["reference"] / data["value_1_thread"] if data.get("reference") else None,
             "ratio": None, "ok": None},
        ]  # fmt: skip
    return [{"name": data.get("name", "?"), "value": data.get("value"), "unit": data.get("unit", ""),
             "target": data.get("target"), "ratio": data.get("ratio"), "ok": data.get("ok")}]  # fmt: skip


def run_one(name: str, quick: bool, device: str | None, timeout: float | None) -> tuple[list[dict], bool]:
    """Run one benchmark; (its rows, whether it ran to the end)."""
    args = command(name, options_of(name), quick, device)
    started = time.perf_counter()
    try:
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [_failure(f"timed out after {timeout:g} s")], False
    seconds = time.perf_counter() - started
    data = parse_rows(result.stdout) if result.returncode == 0 else None
    if data is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return [_failure(f"exit {result.returncode}: {tail[0][:150]}")], False
    rows = normalise(data)
    rows.append({"name": "  (benchmark wall time)", "value": round(seconds, 1), "unit": "s", "target": None,
                 "ratio": None, "ok": None})  # fmt: skip
    return rows, True


def _failure(text: str) -> dict:
    return {"name": f"FAILED: {text}", "value": None, "unit": "", "target": None, "ratio": None, "ok": False}


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(results: list[tuple[str, dict]]) -> str:
    """One markdown table over all benchmarks' rows."""
    lines = ["| benchmark | figure | target | value | ratio | ok |", "|---|---|---:|---:|---:|---|"]
    for bench, row in results:
        unit = f" {row.get('unit')}" if row.get("unit") else ""
        target = "" if row.get("target") is None else f"{_cell(row['target'])}{unit}"
        value = "" if row.get("value") is None else f"{_cell(row['value'], 4)}{unit}"
        ok = {True: "ok", False: "**no**", None: ""}[row.get("ok")]
        if row.get("target") is None and row.get("ok") is not False:
            ok = ""  # an information row
        lines.append(f"| {bench} | {row['name']} | {target} | {value} | {_cell(row.get('ratio'))} | {ok} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced sizes where a benchmark supports them")
    parser.add_argument("--device", default=None, help="passed to benchmarks that take --device (e.g. cuda)")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names (default: all)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    parser.add_argument("--json", action="store_true", help="print all rows as JSON instead of the table")
    args = parser.parse_args()
    results: list[tuple[str, dict]] = []
    all_ran = True
    for name in benchmarks(args.only.split(",") if args.only else None):
        print(f"running bench/{name}.py ...", file=sys.stderr, flush=True)
        rows, ran = run_one(name, args.quick, args.device, args.timeout)
        all_ran &= ran
        results += [(name, row) for row in rows]
    if args.json:
        print(json.dumps([{"benchmark": b, **row} for b, row in results], indent=1))
    else:
        print(table(results))
    return 0 if all_ran else 1


if __name__ == "__main__":
    sys.exit(main())

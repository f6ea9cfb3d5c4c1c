"""Benchmark: preprocess one 512x512x300 synthetic chest CT (1 mm) end to end.

Targets (issue 2): <= 5 s wall and <= 3 GB peak RSS on 2 cores. The measured run is
read NIfTI -> lungs -> crop -> grid -> write npy, in a fresh child process so that its peak RSS
is its own (the phantom is built by the parent and written once).

    python bench/preprocess.py [--shape 300,512,512] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 5.0
TARGET_RSS_GB = 3.0


def _child(image: Path, out_dir: Path) -> None:
    """Run in the child: time the read alone, then the whole preprocess of one case."""
    from covidseg.config import PreprocessConfig
    from covidseg.io import read_ct
    from covidseg.stages.preprocess import CaseInput, preprocess_case

    start = time.perf_counter()
    read_ct(image)
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    record = preprocess_case(CaseInput("bench", "covid", image), out_dir, PreprocessConfig())
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "read_seconds": read_seconds, "lung_ml": record["lung_ml"]}))


def main(shape=(300, 512, 512), repeats: int = 3) -> list[dict]:
    from covidseg.imaging.geometry import axis_aligned_geometry
    from covidseg.imaging.phantom import make_phantom
    from covidseg.io import write_array

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "ct.nii.gz"
        phantom = make_phantom(shape_zyx=shape, spacing_zyx=(1.0, 1.0, 1.0), covid=True, seed=0)
        write_array(image, phantom.hu.round().astype("int16"), axis_aligned_geometry(shape, (1.0, 1.0, 1.0)))
        del phantom
        runs, rss = [], 0.0
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            result = subprocess.run(
                [sys.executable, __file__, "--child", str(image), str(tmp / "out")],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
            rss = max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
    seconds = statistics.median(r["seconds"] for r in runs)
    read_seconds = statistics.median(r["read_seconds"] for r in runs)
    rss_gb = rss / 1024**2  # ru_maxrss is in KiB on Linux
    voxels = "x".join(map(str, shape[::-1]))
    return [
        {
            "name": f"preprocess {voxels} @1 mm, wall (median of {repeats})",
            "value": round(seconds, 2),
            "target": TARGET_SECONDS,
            "unit": "s",
            "ratio": round(seconds / TARGET_SECONDS, 2),
            "ok": seconds <= TARGET_SECONDS,
        },
        {
            "name": "  of which reading the .nii.gz",
            "value": round(read_seconds, 2),
            "target": None,
            "unit": "s",
            "ratio": None,
            "ok": True,
        },
        {
            "name": f"preprocess {voxels}, peak RSS",
            "value": round(rss_gb, 2),
            "target": TARGET_RSS_GB,
            "unit": "GB",
            "ratio": round(rss_gb / TARGET_RSS_GB, 2),
            "ok": rss_gb <= TARGET_RSS_GB,
        },
    ]


def _print(rows: list[dict]) -> None:
    for row in rows:
        target = (
            ""
            if row["target"] is None
            else f"(target <= {row['target']} {row['unit']}, ratio {row['ratio']})"
        )
        print(f"{row['name']:<48} {row['value']:>8} {row['unit']:<3} {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=2, metavar=("IMAGE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="300,512,512", help="Z,Y,X voxels (1 mm)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for bench/run_all.py)")
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), Path(args.child[1]))
    else:
        rows = main(tuple(int(v) for v in args.shape.split(",")), args.repeats)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            _print(rows)

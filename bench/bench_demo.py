"""`pipeline demo` over several seeds: its wall time, and the student's gain over its teacher.

    python bench/bench_demo.py [--seeds 0 1 2] [--keep DIR]

Each seed is a whole `pipeline demo` process in a fresh folder (data split, teacher,
label, filter, student, eval); the table has both models' held-out top-1 per seed, the
mean gain and its spread, and the time of each stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.record import append, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", help="keep each seed's demo folder under this directory")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-demo-"))
    if any((work / f"seed{seed}").exists() for seed in args.seeds):
        parser.error(f"{work} already holds a seed folder: a resumed demo would not be timed")
    reports, walls = [], []
    for seed in args.seeds:
        out = work / f"seed{seed}"
        walls.append(
            timed(
                [sys.executable, "-m", "pipeline", "demo", "--out", str(out), "--seed", str(seed)]
            )[0]
        )
        reports.append(json.loads((out / "report.json").read_text()))
    if not args.keep:
        shutil.rmtree(work)

    gains = [100 * r["rounds"][0]["gain"] for r in reports]
    rows = [
        "| seed | teacher top-1 | student top-1 | gain (points) | pseudo-labels | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for seed, report, gain, wall in zip(args.seeds, reports, gains, walls, strict=True):
        rows.append(
            f"| {seed} | {100 * report['teacher']['top1']:.1f}% | "
            f"{100 * report['student']['top1']:.1f}% | {gain:+.1f} | "
            f"{report['rounds'][0]['pseudo_labels']:,} | {wall:.0f} |"
        )
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    rows.append(
        f"| **mean** | {statistics.mean(100 * r['teacher']['top1'] for r in reports):.1f}% | "
        f"{statistics.mean(100 * r['student']['top1'] for r in reports):.1f}% | "
        f"**{statistics.mean(gains):+.1f}** (std {spread:.1f}, min {min(gains):+.1f}) | | "
        f"{statistics.mean(walls):.0f} |"
    )
    stages = ", ".join(f"{name} {s:.0f} s" for name, s in reports[0]["timings"].items())
    rows += ["", f"Stages of seed {args.seeds[0]}: {stages}."]
    append(
        f"pipeline demo: teacher vs student over seeds {', '.join(map(str, args.seeds))}",
        f"python bench/bench_demo.py --seeds {' '.join(map(str, args.seeds))}",
        rows,
        "demo",
        {"seeds": args.seeds, "gains": gains, "wall_s": walls},
    )


if __name__ == "__main__":
    main()

"""`pipeline demo` over several seeds: its wall time, and the student's gain over its teacher.

    python bench/bench_demo.py [--seeds 10 11 12 13 14] [--rounds 2] [--keep DIR]

Each seed is a whole `pipeline demo` process in a fresh folder (data split, teacher,
label, filter, student, eval); the table has both models' held-out top-1 per seed, the
mean gain, its minimum and standard error, and the time of each stage. With `--rounds 2`
the student teaches a second student; round 1 of such a run is the one-round demo, step
for step, and its time is the sum of the stages up to round 1's evaluation. Then the two
controls of `pipeline.demo.CONTROLS` train beside each seed's demo (`--no-controls` skips
them): the round-1 student's recipe and seed on the labeled digits alone (supervised), and
on its pseudo-labels without RandAugment, dropout or stochastic depth (noise-free); the
round-1 student minus each control says what the pseudo-labels and the noise add.

The default seeds, 10 to 14, played no part in choosing the recipe (bench/select_demo.py
chose it on worlds carved from labeled digits of other seeds).
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
from pipeline.demo import CONTROLS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep", help="keep each seed's demo folder under this directory")
    parser.add_argument("--no-controls", dest="controls", action="store_false")
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
                + ["--rounds", str(args.rounds)]
            )[0]
        )
        report = json.loads((out / "report.json").read_text())
        if args.controls:
            report["controls"] = {kind: _control(out, seed, kind) for kind in CONTROLS}
        reports.append(report)
    if not args.keep:
        shutil.rmtree(work)

    rows = [
        "| seed | teacher top-1 | student top-1 | gain (points) | pseudo-labels | wall s, round 1 |",
        "|---|---|---|---|---|---|",
    ]
    figures: dict = {"seeds": args.seeds, "rounds": args.rounds, "wall_s": walls}
    for r in range(args.rounds):
        rounds = [report["rounds"][r] for report in reports]
        gains = [100 * x["gain"] for x in rounds]
        round_walls = [_seconds_to_round(report, r + 1) for report in reports]
        if args.rounds > 1:
            rows.append(f"| **round {r + 1}** | | | | | |")
        for seed, x, gain, wall in zip(args.seeds, rounds, gains, round_walls, strict=True):
            rows.append(
                f"| {seed} | {100 * x['teacher']['top1']:.1f}% | {100 * x['student']['top1']:.1f}% | "
                f"{gain:+.1f} | {x['pseudo_labels']:,} | {wall:.0f} |"
            )
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        rows.append(
            f"| **mean** | {statistics.mean(100 * x['teacher']['top1'] for x in rounds):.1f}% | "
            f"{statistics.mean(100 * x['student']['top1'] for x in rounds):.1f}% | "
            f"**{statistics.mean(gains):+.1f}** (std {spread:.1f}, min {min(gains):+.1f}) | | "
            f"{statistics.mean(round_walls):.0f} |"
        )
        figures[f"round{r + 1}"] = {"gains": gains, "wall_s": round_walls}
    rows += ["", "| difference (points of top-1) | per seed | mean | min | std. error |"]
    rows.append("|---|---|---|---|---|")
    differences = {
        f"round {r + 1} student - {'round-0 teacher' if r == 0 else f'round {r} student'}": [
            100 * rep["rounds"][r]["gain"] for rep in reports
        ]
        for r in range(args.rounds)
    }
    if args.rounds > 1:
        differences[f"round {args.rounds} student - round-0 teacher"] = [
            100 * (rep["rounds"][-1]["student"]["top1"] - rep["teacher"]["top1"]) for rep in reports
        ]
    if args.controls:
        for kind in CONTROLS:
            differences[f"round 1 student - {kind} control"] = [
                100 * (rep["rounds"][0]["student"]["top1"] - rep["controls"][kind]["top1"])
                for rep in reports
            ]
            figures[f"control_{kind}"] = [rep["controls"][kind]["top1"] for rep in reports]
    for name, values in differences.items():
        error = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
        rows.append(
            f"| {name} | {', '.join(f'{v:+.1f}' for v in values)} | "
            f"**{statistics.mean(values):+.1f}** | {min(values):+.1f} | {error:.2f} |"
        )
    figures["differences"] = differences
    models = ", ".join(f"round {x['round']} {x.get('model')}" for x in reports[0]["rounds"])
    rows += ["", f"Students: {models}."]
    stages = ", ".join(f"{name} {s:.0f} s" for name, s in reports[0]["timings"].items())
    rows += ["", f"Stages of seed {args.seeds[0]}: {stages}. Whole process: {walls[0]:.0f} s."]
    append(
        f"pipeline demo: teacher vs student over seeds {', '.join(map(str, args.seeds))}, "
        f"{args.rounds} round{'s' if args.rounds > 1 else ''}",
        f"python bench/bench_demo.py --seeds {' '.join(map(str, args.seeds))} --rounds {args.rounds}",
        rows,
        "demo",
        figures,
    )


def _control(out: Path, seed: int, kind: str) -> dict:
    """A control trained beside a finished demo, in a process of its own like the demo."""
    scores = out / f"control-{kind}.json"
    code = (
        "import json, sys; from pipeline.demo import run_control; from pathlib import Path; "
        "Path(sys.argv[4]).write_text(json.dumps(run_control(sys.argv[1], int(sys.argv[2]), "
        "sys.argv[3])))"
    )
    timed([sys.executable, "-c", code, str(out), str(seed), kind, str(scores)])
    return json.loads(scores.read_text())


def _seconds_to_round(report: dict, last: int) -> float:
    """Seconds of the stages up to round `last`'s evaluation: a one-round demo's time when
    `last` is 1 (plus the process start-up, a few seconds)."""
    later = tuple(f"round {r} " for r in range(last + 1, len(report["rounds"]) + 1))
    return sum(s for name, s in report["timings"].items() if not name.startswith(later))


if __name__ == "__main__":
    main()

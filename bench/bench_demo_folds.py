"""Round 1 of the demo with its held-out split rotated over folds: every digit is scored.

    python bench/bench_demo_folds.py [--seeds 100 ... 114] [--folds 5] [--jobs 2] [--keep DIR]

The report (bench/bench_demo.py) scores each seed on one held-out split of 297 digits, where
one image is 0.34 points and the draw of the split alone moves a seed's gain by about a
point. Here each seed keeps the demo's 50 labeled digits and its round-0 teacher (trained
once, as `pipeline demo` trains it), and cuts the other 1,747 digits into K folds,
stratified by class and drawn by the seed. Fold k is held out, and the rest of the 1,747 is
the unlabeled corpus that the teacher labels, the filter selects from and the round-1 student
trains on, as in the demo. So every digit that is not labeled is scored once, by the teacher
and by the student of the fold that held it out, and a seed's top-1 is pooled over its
folds. The recipe is configs/demo.yaml as shipped; nothing is chosen here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_demo import (  # noqa: E402
    difference_row,
    interval,
    report_arguments,
    selection_truth,
)
from bench.record import ROOT, append, timed  # noqa: E402
from bench.select_demo import REPORT_SEEDS  # noqa: E402
from rs_pseudolabel.data.digits import split_digits, write_split  # noqa: E402
from rs_pseudolabel.pipeline.demo import (  # noqa: E402
    DEFAULT_RECIPE,
    Splits,
    Timings,
    run_round,
    train_part,
    trainer_seed,
)
from rs_pseudolabel.students.config import load_yaml  # noqa: E402


def fold_splits(seed: int, labeled: int, folds: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The demo's labeled digits for `seed`, and the rest cut into `folds` held-out folds."""
    targets = load_digits().target
    train = split_digits(labeled, seed)["labeled"]
    rest = np.setdiff1d(np.arange(len(targets)), train)
    cut = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return train, [np.sort(rest[held]) for _, held in cut.split(rest, targets[rest])]


def run_seed(work: str, seed: int, folds: int, config: str | None) -> dict:
    """One seed: its data, its teacher, and round 1 of every fold; a fold finished before
    (its fold.json) is read back, and the trainer finds a finished teacher finished."""
    recipe = load_yaml(config or DEFAULT_RECIPE)
    torch.set_num_threads(int(recipe.get("threads", torch.get_num_threads())))
    out = Path(work) / f"seed{seed}"
    train, held = fold_splits(seed, recipe["data"]["labeled"], folds)
    shard_size = recipe["data"]["shard_size"]
    labeled = str(out / "data" / "labeled")
    if not (out / "data" / "done").exists():
        shutil.rmtree(out / "data", ignore_errors=True)
        write_split(labeled, "labeled", train, True, shard_size)
        for k, val in enumerate(held):
            corpus = np.setdiff1d(np.concatenate(held), val)
            write_split(str(out / "data" / f"fold{k}" / "val"), "val", val, True, shard_size)
            write_split(str(out / "data" / f"fold{k}" / "unlabeled"), "unlabeled", corpus,
                        False, shard_size)  # fmt: skip
        (out / "data" / "done").touch()
    teacher = str(out / "round0-teacher")
    # the teacher's per-epoch log reads fold 0: its weights do not depend on what it logs
    timings = Timings()
    timings("train teacher", train_part, teacher, labeled, str(out / "data" / "fold0" / "val"),
            recipe["teacher"], recipe["recipe"], trainer_seed(seed, 0))  # fmt: skip
    results = []
    for k in range(folds):
        done = out / f"fold{k}" / "fold.json"
        if not done.exists():
            data = out / "data" / f"fold{k}"
            splits = Splits(labeled, str(data / "unlabeled"), str(data / "val"))
            steps = Timings()
            line = run_round(1, recipe, str(out / f"fold{k}"), seed, teacher, splits, None, steps)
            line["selection_right"] = selection_truth(out / f"fold{k}" / "round1-train")
            line["seconds"] = round(sum(steps.values()), 1)
            done.write_text(json.dumps(line, indent=1))
        results.append(json.loads(done.read_text()))
        print(f"seed {seed} fold {k}: {100 * results[-1]['gain']:+.1f}", flush=True)
    record = {"seed": seed, "teacher_s": timings.get("train teacher"), "folds": results}
    (out / "folds.json").write_text(json.dumps(record, indent=1))
    return record


def pooled(record: dict, who: str) -> float:
    """Points of top-1 over every fold's held-out digits together."""
    scored = [fold[who]["samples"] for fold in record["folds"]]
    right = [fold[who]["top1"] * n for fold, n in zip(record["folds"], scored, strict=True)]
    return 100 * sum(right) / sum(scored)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    report_arguments(parser)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    if args.folds < 2:
        parser.error(f"--folds must be 2 or more, got {args.folds}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-folds-"))
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda seed: _one_seed(work, seed, args), args.seeds))
    if not args.keep:
        shutil.rmtree(work)
    rows, figures = _tables(args, records)
    command = f"python bench/bench_demo_folds.py --folds {args.folds} --jobs {args.jobs}"
    if args.config:
        command += f" --config {args.config}"
    if args.seeds != list(REPORT_SEEDS):
        command += f" --seeds {' '.join(map(str, args.seeds))}"
    which = "the report seeds" if args.seeds == list(REPORT_SEEDS) else f"{len(args.seeds)} seeds"
    append(
        f"pipeline demo's round 1 over {which}, every digit scored ({args.folds} folds)",
        command,
        rows,
        "demo_folds",
        figures,
    )


def _one_seed(work: Path, seed: int, args: argparse.Namespace) -> dict:
    """run_seed in a process of its own, as the demo runs."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from bench.bench_demo_folds import "
        "run_seed; run_seed(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] or None)"
    )
    wall = timed([sys.executable, "-c", code, str(ROOT), str(work), str(seed), str(args.folds),
                  args.config or ""])[0]  # fmt: skip
    print(f"seed {seed}: done in {wall:.0f} s", flush=True)
    return json.loads((work / f"seed{seed}" / "folds.json").read_text())


def _tables(args: argparse.Namespace, records: list[dict]) -> tuple[list[str], dict]:
    rows = [
        "| seed | round-0 teacher | round 1 student | gain | gain per fold | pseudo-labels "
        "right per fold |",
        "|---|---|---|---|---|---|",
    ]
    gains = []
    for record in records:
        teacher, student = pooled(record, "teacher"), pooled(record, "student")
        gains.append(round(student - teacher, 4))
        folds = record["folds"]
        rows.append(
            f"| {record['seed']} | {teacher:.1f} | {student:.1f} | {student - teacher:+.1f} | "
            + ", ".join(f"{100 * f['gain']:+.1f}" for f in folds)
            + " | "
            + ", ".join(f"{100 * f['selection_right']:.0f}%" for f in folds)
            + " |"
        )
    name = "round 1 student - round-0 teacher, every digit scored"
    scored = sum(f["student"]["samples"] for f in records[0]["folds"])
    seconds = [f["seconds"] for r in records for f in r["folds"]]
    rows += [
        "",
        "| difference, points of top-1 (paired by seed) | n | mean | 95% CI | min | per seed |",
        "|---|---|---|---|---|---|",
        difference_row(name, gains),
        "",
        f"Each seed's top-1 is pooled over its {args.folds} folds ({scored} digits, all but "
        "the 50 labeled). Gain per fold: that fold's student minus the teacher on the fold's "
        "held-out digits. Pseudo-labels right: the share of the filter's selection whose "
        "top-1 is the class the unlabeled split hides (scoring only). "
        f"{args.jobs} seeds ran at a time; round 1 of a fold (label, filter, student, eval) "
        f"took {min(seconds):.0f} to {max(seconds):.0f} s under that load.",
    ]
    figures = {
        "seeds": args.seeds,
        "folds": args.folds,
        "top1": {who: [pooled(r, who) for r in records] for who in ("teacher", "student")},
        "fold_gains": [[f["gain"] for f in r["folds"]] for r in records],
        "differences": {name: {"values": gains, "mean_ci": interval(gains)}},
    }
    return rows, figures


if __name__ == "__main__":
    main()

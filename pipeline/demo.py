"""`pipeline demo`: the whole idea on the embedded digits, in minutes on two CPU cores.

    data digits -> train the round-0 teacher on the few labeled digits -> label the
    unlabeled split -> filter and balance -> train a noised student on labeled + pseudo
    -> evaluate both on the held-out split (-> with --rounds 2 the student teaches a
    student of its own, as configs/demo.yaml's `later_rounds` says: larger, or relabeling
    round 1's selection)

Every step is the real stage (the same Beam jobs, the same trainer) run with the bundled
recipe configs/demo.yaml, and every step is resumable: rerun the command and finished work
is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from rs_pseudolabel.data.storage import join, write_json
from rs_pseudolabel.pipeline.data_commands import run_digits
from rs_pseudolabel.pipeline.filter import FilterArgs
from rs_pseudolabel.pipeline.filter import run as filter_run
from rs_pseudolabel.pipeline.label import LabelArgs
from rs_pseudolabel.pipeline.label import run as label_run
from rs_pseudolabel.pipeline.options import SELECTING
from rs_pseudolabel.students.config import load_yaml
from rs_pseudolabel.students.eval import evaluate_run
from rs_pseudolabel.students.run_dir import has_checkpoint
from rs_pseudolabel.students.train import train

DEFAULT_RECIPE = "demo"  # configs/demo.yaml, bundled with the package

SEEDS_PER_ROUND = 1000  # trainer seed of round r: the demo's seed + r x this


def trainer_seed(seed: int, round_: int) -> int:
    """Each round's model starts from weights and noise of its own (the round-0 teacher
    from the demo's seed itself), and seeds of two demos never meet below 1,000 rounds: a
    student drawn like its teacher would start from its teacher's initial weights."""
    return seed + SEEDS_PER_ROUND * round_


def round_parts(recipe: dict, round_: int) -> tuple[dict, dict]:
    """Round r's student and filter settings: round 1's `student` and `filter`, from round
    2 on with `later_rounds` over them (a larger student, the selection kept)."""
    later = recipe.get("later_rounds", {}) if round_ > 1 else {}
    student = {**recipe["student"], **later.get("student", {})}
    student["set"] = {**recipe["student"].get("set", {}), **later.get("student", {}).get("set", {})}
    return student, {**recipe["filter"], **later.get("filter", {})}


def train_part(
    run_dir: str,
    labeled: str,
    val: str,
    part: dict,
    recipe: str,
    seed: int,
    pseudo: str | None = None,
) -> None:
    """Train, continue a run cut short, or find it finished: the trainer decides from the
    run's fingerprint, so an edited recipe is refused rather than an old run reused."""
    # the model by --set as well: the bundled recipe names one, and a round may grow it
    overrides = [f"seed={seed}", f"model={part['model']}"]
    overrides += [f"{k}={v}" for k, v in part.get("set", {}).items()]
    train(
        labeled=labeled,
        out=run_dir,
        model=part["model"],
        pseudo=pseudo,
        val=val,
        config=recipe,
        overrides=overrides,
        epochs=part["epochs"],
        resume=has_checkpoint(run_dir),
    )


def run(
    out: str = "demo-out",
    seed: int = 0,
    rounds: int = 1,
    recipe_path: str | None = None,
    data_dir: str | None = None,
) -> dict:
    """The demo in `out`. `data_dir` holds labeled/, unlabeled/ and val/ shards written
    beforehand (how bench/select_demo.py runs candidate recipes on splits of labeled digits
    alone); None writes the digits split by `seed`."""
    recipe = load_yaml(recipe_path or DEFAULT_RECIPE)
    torch.set_num_threads(int(recipe.get("threads", torch.get_num_threads())))
    started, timed = time.monotonic(), Timings()
    data = data_dir or join(out, "data")
    if data_dir is None:
        digits = recipe["data"]
        timed("data", run_digits, data, labeled=digits["labeled"], seed=seed,
              shard_size=digits["shard_size"])  # fmt: skip
    splits = Splits(*(join(data, s) for s in ("labeled", "unlabeled", "val")))
    teacher = join(out, "round0-teacher")
    timed("train teacher", train_part, teacher, splits.labeled, splits.val, recipe["teacher"],
          recipe["recipe"], trainer_seed(seed, 0))  # fmt: skip
    rounds_report, first_selection = [], None
    for r in range(1, rounds + 1):
        done = run_round(r, recipe, out, seed, teacher, splits, first_selection, timed)
        rounds_report.append(done)
        first_selection = first_selection or join(out, f"round{r}-train")
        teacher = join(out, f"round{r}-student")
    report = {
        "teacher": rounds_report[0]["teacher"],
        "student": rounds_report[-1]["student"],
        "rounds": rounds_report,
        "seed": seed,
        "labeled": recipe["data"]["labeled"],
        "seconds": round(time.monotonic() - started, 1),
        "timings": dict(timed),
    }
    write_json(join(out, "report.json"), report)
    _plot(report, join(out, "report.png"))
    return report


class Splits(NamedTuple):
    labeled: str
    unlabeled: str
    val: str


class Timings(dict):
    """Stage seconds by name, each filled by calling this with the stage to run."""

    def __call__(self, name: str, step: Callable, *args: object, **kwargs: object) -> object:
        tick = time.monotonic()
        result = step(*args, **kwargs)
        self[name] = round(time.monotonic() - tick, 1)
        return result


def run_round(
    r: int,
    recipe: dict,
    out: str,
    seed: int,
    teacher: str,
    splits: Splits,
    first_selection: str | None,
    timed: Timings,
) -> dict:
    """Round r: `teacher` labels the unlabeled split, the filter selects (or keeps round 1's
    selection), a student trains, both are scored; its line of the report."""
    labels, training, student = (join(out, f"round{r}-{s}") for s in ("labels", "train", "student"))
    student_part, filter_part = round_parts(recipe, r)
    label_args = LabelArgs(
        teacher=teacher, input=splits.unlabeled, output=labels, **recipe["label"]
    )
    timed(f"round {r} label", label_run, label_args, [])
    keep = filter_part.pop("keep_selection", False) and first_selection
    if keep:  # round 1's images and copies as they are: nothing chooses or balances
        # the options that chose round 1's selection: it embodies them, and the filter
        # refuses them beside it
        filter_part = {k: v for k, v in filter_part.items() if k not in SELECTING}
    filter_args = FilterArgs(input=labels, output=training, keep_selection=keep or None,
                             **filter_part)  # fmt: skip
    filtered = timed(f"round {r} filter", filter_run, filter_args, [])
    timed(f"round {r} train student", train_part, student, splits.labeled, splits.val,
          student_part, recipe["recipe"], trainer_seed(seed, r), pseudo=training)  # fmt: skip
    scores = {
        name: timed(f"round {r} eval {name}", evaluate_run, path, splits.val, progress=False)
        for name, path in (("teacher", teacher), ("student", student))
    }
    return {
        "round": r,
        "model": student_part["model"],
        "kept_selection": bool(keep),
        **scores,
        "pseudo_labels": filtered["samples_written"],
        "gain": scores["student"]["top1"] - scores["teacher"]["top1"],
    }


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["teacher (round 0)"] + [f"student (round {r['round']})" for r in report["rounds"]]
    scores = [report["rounds"][0]["teacher"]["top1"]] + [
        r["student"]["top1"] for r in report["rounds"]
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(
        names, [100 * s for s in scores], color=["#4c72b0"] + ["#55a868"] * len(report["rounds"])
    )
    ax.bar_label(bars, fmt="%.1f%%")
    low = max(0, 100 * min(scores) - 10)
    ax.set(
        ylim=(low, 100),
        ylabel="held-out top-1 (%)",
        title=f"Noisy Student on the digits: {report['labeled']} labels, seed {report['seed']}",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(report: dict) -> str:
    lines = ["model                 top-1    top-5   (held-out digits)"]
    lines.append(
        f"teacher (round 0)    {100 * report['teacher']['top1']:5.1f}%  {100 * report['teacher']['top5']:5.1f}%"
    )
    for r in report["rounds"]:
        s = r["student"]
        lines.append(
            f"student (round {r['round']})    {100 * s['top1']:5.1f}%  {100 * s['top5']:5.1f}%"
            f"   gain {100 * r['gain']:+.1f} points, {r.get('model', '')}, "
            f"{r['pseudo_labels']} pseudo-labels"
            + (" (round 1's selection, relabeled)" if r.get("kept_selection") else "")
        )
    lines.append(
        f"finished in {report['seconds']:.0f} s; report.json and report.png are in the output folder"
    )
    return "\n".join(lines)

"""`pipeline demo`: the whole idea on the embedded digits, in minutes on two CPU cores.

    data digits -> train the round-0 teacher on the few labeled digits -> label the
    unlabeled split -> filter and balance -> train a noised student on labeled + pseudo
    -> evaluate both on the held-out split (-> with --rounds 2 the student teaches again)

Every step is the real stage (the same Beam jobs, the same trainer) run with the bundled
recipe configs/demo.yaml, and every step is resumable: rerun the command and finished work
is skipped.
"""

from __future__ import annotations

import time

import torch

from data.storage import join, write_json
from pipeline.data_commands import run_digits
from pipeline.filter import FilterArgs
from pipeline.filter import run as filter_run
from pipeline.label import LabelArgs
from pipeline.label import run as label_run
from students.config import load_yaml
from students.eval import evaluate_run
from students.train import train
from students.utils import has_checkpoint

DEFAULT_RECIPE = "demo"  # configs/demo.yaml, bundled with the package


def _train(
    run_dir: str,
    labeled: str,
    val: str,
    part: dict,
    recipe: str,
    seed: int,
    pseudo: str | None = None,
) -> None:
    """Train, continue a run cut short, or find it finished: the trainer decides from the
    run's fingerprint, so an edited recipe is refused rather than an old run reused. The
    demo's seed is the trainer's too, so seeds differ in initial weights and noise, not only
    in the split."""
    overrides = [f"seed={seed}"] + [f"{k}={v}" for k, v in part.get("set", {}).items()]
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
    trainer_recipe = recipe["recipe"]  # a bundled recipe's name, or a path
    started, timings = time.monotonic(), {}

    def timed(name: str, step, *args, **kwargs):
        tick = time.monotonic()
        result = step(*args, **kwargs)
        timings[name] = round(time.monotonic() - tick, 1)
        return result

    data = data_dir or join(out, "data")
    if data_dir is None:
        timed(
            "data",
            run_digits,
            data,
            labeled=recipe["data"]["labeled"],
            seed=seed,
            shard_size=recipe["data"]["shard_size"],
        )
    labeled, unlabeled, val = (join(data, s) for s in ("labeled", "unlabeled", "val"))
    teacher = join(out, "round0-teacher")
    timed("train teacher", _train, teacher, labeled, val, recipe["teacher"], trainer_recipe, seed)
    rounds_report = []
    for r in range(1, rounds + 1):
        labels, training, student = (
            join(out, f"round{r}-{s}") for s in ("labels", "train", "student")
        )
        timed(
            f"round {r} label",
            label_run,
            LabelArgs(teacher=teacher, input=unlabeled, output=labels, **recipe["label"]),
            [],
        )
        filtered = timed(
            f"round {r} filter",
            filter_run,
            FilterArgs(input=labels, output=training, **recipe["filter"]),
            [],
        )
        timed(
            f"round {r} train student",
            _train,
            student,
            labeled,
            val,
            recipe["student"],
            trainer_recipe,
            seed,
            pseudo=training,
        )
        scores = {
            name: timed(f"round {r} eval {name}", evaluate_run, path, val, progress=False)
            for name, path in (("teacher", teacher), ("student", student))
        }
        rounds_report.append(
            {
                "round": r,
                **scores,
                "pseudo_labels": filtered["samples_written"],
                "gain": scores["student"]["top1"] - scores["teacher"]["top1"],
            }
        )
        teacher = student
    report = {
        "teacher": rounds_report[0]["teacher"],
        "student": rounds_report[-1]["student"],
        "rounds": rounds_report,
        "seed": seed,
        "labeled": recipe["data"]["labeled"],
        "seconds": round(time.monotonic() - started, 1),
        "timings": timings,
    }
    write_json(join(out, "report.json"), report)
    _plot(report, join(out, "report.png"))
    return report


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
            f"   gain {100 * r['gain']:+.1f} points, {r['pseudo_labels']} pseudo-labels"
        )
    lines.append(
        f"finished in {report['seconds']:.0f} s; report.json and report.png are in the output folder"
    )
    return "\n".join(lines)

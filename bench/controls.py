"""The demo's controls: the round-1 student's run with one ingredient taken away or
replaced, trained beside a finished `pipeline demo` by `bench/bench_demo.py` so that the
student's gain can be put down to each ingredient."""

from __future__ import annotations

import torch

from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.storage import join
from rs_pseudolabel.pipeline.demo import DEFAULT_RECIPE, round_parts, train_part, trainer_seed
from rs_pseudolabel.students.config import load_yaml, resolve_recipe
from rs_pseudolabel.students.eval import evaluate_run

# What each control changes in the round-1 student's run: the same model, recipe and
# trainer seed (so the same initial weights), one ingredient taken away or replaced.
CONTROLS: dict[str, dict] = {
    # The labeled digits alone, at the student's compute: its steps, LR schedule and images
    # per step (labeled + pseudo-labeled), every one of them drawn from the labeled split.
    "supervised": {"pseudo": None, "set": {}, "matched": True},
    # Its pseudo-labels, with no input or model noise (the crop stays).
    "noise-free": {
        "pseudo": "round1-train",
        "set": {"randaugment_ops": 0, "dropout": 0.0, "stochastic_depth": 0.0},
    },
    # Its selection with the classes the unlabeled split hides in place of the teacher's
    # labels: the headroom of a perfect teacher. The pipeline never sees those classes;
    # `bench/bench_demo.py` writes round1-oracle from them, for scoring only.
    "oracle": {"pseudo": "round1-oracle", "set": {}},
}


def matched_compute(trainer_recipe: str, part: dict) -> dict[str, object]:
    """Recipe keys that give a run on labeled images alone the compute of `part`'s run on
    labeled + pseudo-labeled ones: (1 + unlabeled_ratio) times the labeled batch and the
    epoch's samples (so the same steps, each of as many images), and the LR per 256 divided
    by as much (so the same LR at every step: the trainer scales it by the labeled batch)."""
    overrides = [f"{k}={v}" for k, v in part.get("set", {}).items()]
    resolved = resolve_recipe(trainer_recipe, overrides, model=part["model"])
    if resolved.epoch_samples is None:
        raise UsageError("a matched control needs the student's epoch_samples in the recipe")
    grow = 1 + resolved.unlabeled_ratio
    return {
        "batch_size": round(resolved.batch_size * grow),
        "epoch_samples": round(resolved.epoch_samples * grow),
        "lr": resolved.lr / grow,
        "unlabeled_ratio": 0,
    }


def run_control(out: str, seed: int, kind: str, recipe_path: str | None = None) -> dict:
    """Train and evaluate control `kind` beside a finished demo in `out` (its data and its
    round-1 selection): what the round-1 student scores without the pseudo-labels, without
    the noise, or with true labels in their place, so its gain can be put down to each."""
    recipe = load_yaml(recipe_path or DEFAULT_RECIPE)
    torch.set_num_threads(int(recipe.get("threads", torch.get_num_threads())))
    control = CONTROLS[kind]
    part, _ = round_parts(recipe, 1)
    changes = dict(control["set"])
    if control.get("matched"):
        changes |= matched_compute(recipe["recipe"], part)
    part = {**part, "set": {**part.get("set", {}), **changes}}
    data, run_dir = join(out, "data"), join(out, f"control-{kind}")
    labeled, val = join(data, "labeled"), join(data, "val")
    pseudo = join(out, control["pseudo"]) if control["pseudo"] else None
    train_part(run_dir, labeled, val, part, recipe["recipe"], trainer_seed(seed, 1), pseudo=pseudo)
    return evaluate_run(run_dir, val, progress=False)

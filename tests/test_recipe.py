"""A student recipe: the bundled recipes, sizes from the model table, flags over --set over the
file, the keys refused, the trainer's Python API checked as its command line."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest

from rs_pseudolabel import configs
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.students.config import (
    RECIPE_KEYS,
    Recipe,
    TrainArgs,
    add_arguments,
    other_model_note,
    resolve,
    resolve_recipe,
    train_flag_values,
)
from rs_pseudolabel.students.train import warmup_cosine
from rs_pseudolabel.teachers import get_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_one_imagenet_recipe_takes_each_size_from_the_model_table():
    for name in ("rs-50", "rs-101", "rs-152", "rs-200", "rs-270", "rs-350", "rs-420"):
        recipe = resolve_recipe("imagenet", model=name)
        table = get_config(name)
        assert (recipe.epochs, recipe.batch_size, recipe.lr) == (350, 4096, 0.1)
        assert recipe.weight_decay == 4e-5 and recipe.ema_decay == 0.9999
        assert (recipe.num_classes, recipe.epoch_samples) == (1000, 1_281_167)
        assert recipe.dropout == table.drop_rate == (0.4 if name == "rs-420" else 0.25)
        assert recipe.stochastic_depth == table.drop_path_rate
        assert recipe.image_size == table.train_size
        assert recipe.randaugment_magnitude == table.randaugment_magnitude
        assert recipe.micro_batch == table.micro_batch > 0
        assert None not in recipe.to_dict().values()
    # The paper's per-size numbers, as the table gives them.
    small, large = (
        resolve_recipe("imagenet", model="rs-50"),
        resolve_recipe("imagenet", model="rs-350"),
    )
    assert (small.image_size, small.randaugment_magnitude, small.stochastic_depth) == (160, 10, 0)
    assert (large.image_size, large.randaugment_magnitude, large.stochastic_depth) == (256, 15, 0.1)


def test_randaugment_magnitude_follows_the_training_resolution():
    # The official RS-101 at 160 px uses M=10; the same model at its table's 192 px, 15.
    def magnitude(*overrides: str) -> float:
        return resolve_recipe("imagenet", overrides, model="rs-101").randaugment_magnitude

    assert (magnitude("image_size=160"), magnitude(), magnitude("image_size=161")) == (10, 15, 15)
    assert magnitude("image_size=160", "randaugment_magnitude=7") == 7


def test_finetune_recipe_is_labeled_only_unaugmented_short_and_at_the_size_given():
    tuned = resolve_recipe("finetune", ["image_size=320"], model="rs-152")
    assert (tuned.image_size, tuned.eval_size) == (320, 320)
    assert tuned.unlabeled_ratio == tuned.randaugment_ops == tuned.stochastic_depth == 0
    assert (tuned.train_crop, tuned.flip, tuned.dropout) == ("center", False, 0)
    assert tuned.freeze_through == "layer1"
    assert tuned.epochs * tuned.epoch_samples == pytest.approx(1.5 * 1_281_167, abs=2)
    # The main schedule's peak LR, run at its tail: the 350 ImageNet epochs in this file's
    # half-ImageNet epochs, of which the fine-tune's are the last.
    main = resolve_recipe("imagenet", model="rs-152")
    assert tuned.lr == main.lr and tuned.ema_decay == 0.99
    assert tuned.schedule_epochs * tuned.epoch_samples == pytest.approx(
        main.epochs * main.epoch_samples, abs=tuned.schedule_epochs
    )
    steps = tuned.schedule_epochs * 100  # any steps per epoch: the shares are what count
    first = warmup_cosine((tuned.schedule_epochs - tuned.epochs) * 100, 10 * 100, steps)
    assert 0 < first < 1e-3


def test_keys_that_only_make_sense_together_are_refused_apart():
    with pytest.raises(ValueError, match="set flip false and randaugment_ops 0 with it"):
        resolve_recipe("digits", ["train_crop=center"])
    with pytest.raises(
        ValueError, match="'train_crop' must be one of random, center, got 'middle'"
    ):
        resolve_recipe("digits", ["train_crop=middle"])
    with pytest.raises(ValueError, match="schedule_epochs 5 is shorter than the run's 8"):
        resolve_recipe("digits", ["schedule_epochs=5"])


def test_bundled_recipes_resolve_by_name_or_path():
    trainer_recipes = [name for name in configs.names() if name != "demo"]  # demo: a pipeline's
    assert trainer_recipes == ["digits", "finetune", "imagenet"]
    by_name = resolve_recipe("digits")
    assert by_name == resolve_recipe(CONFIGS / "digits.yaml") == resolve_recipe("digits.yaml")
    assert by_name.flip is False and by_name.model == "rs-mini"
    with pytest.raises(ValueError, match="config file not found: nope .bundled: demo, digits"):
        resolve_recipe("nope", model="rs-mini")
    with pytest.raises(ValueError, match="config file not found"):
        resolve_recipe("../pyproject", model="rs-mini")


def test_flags_beat_set_which_beats_the_file(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: rs-mini\nepochs: 3\nlr: 0.2\nbatch_size: 8\n")
    resolved = resolve_recipe(recipe, ["lr=0.3", "epochs=4", "flip=false"], epochs=5)
    assert (resolved.lr, resolved.epochs, resolved.batch_size) == (0.3, 5, 8)
    assert resolved.flip is False
    assert resolve_recipe(recipe, ["crop_scale=[0.3, 1]"]).crop_scale == (0.3, 1.0)
    assert list(resolved.to_dict()) == list(RECIPE_KEYS)
    # Another model than the file's is a flag like any other, by either way of giving it,
    # and the run says so in one line.
    for other in (resolve_recipe(recipe, model="rs-50"), resolve_recipe(recipe, ["model=rs-50"])):
        assert (other.model, other.lr) == ("rs-50", 0.2)
        assert other_model_note(recipe, other) == (
            f"note: training rs-50 with the recipe {recipe}, written for rs-mini (its other "
            "keys as they are)"
        )
    assert other_model_note(recipe, resolved) is None
    assert other_model_note(None, resolved) is None


def test_command_line_flags_come_from_the_dataclasses():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--labeled", "L", "--out", "O", "--config", "digits", "--set", "lr=0.2"]
    args, recipe = resolve(
        train_flag_values(parser.parse_args([*argv, "--epochs", "3", "--seed", "7"]))
    )
    assert (args.labeled, args.out, args.pseudo, args.resume, args.device) == (
        "L",
        "O",
        None,
        False,
        "auto",
    )
    assert (recipe.model, recipe.epochs, recipe.lr, recipe.seed) == ("rs-mini", 3, 0.2, 7)
    flags = {f"--{f.name.replace('_', '-')}" for f in fields(TrainArgs) if f.name != "overrides"}
    flags |= {f"--{f.name.replace('_', '-')}" for f in fields(Recipe) if f.metadata["flag"]}
    assert flags | {"--set", "-h", "--help"} == {
        o for a in parser._actions for o in a.option_strings
    }


def test_unknown_keys_are_named(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown config key 'nope' in --set"):
        resolve_recipe(overrides=["nope=1"], model="rs-mini")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: rs-mini\nwarmup: 3\n")
    with pytest.raises(ValueError, match=f"'warmup' in {recipe}"):
        resolve_recipe(recipe)
    with pytest.raises(ValueError, match="'crop_scale'"):
        resolve_recipe(overrides=["crop_scale=[0, 2]"], model="rs-mini")
    with pytest.raises(
        ValueError, match=re.escape("'ema_decay' must be a number in [0, 1), got 1")
    ):
        resolve_recipe(overrides=["ema_decay=1"], model="rs-mini")
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        resolve({"labeled": "L", "out": "O", "model": "rs-mini", "learning_rate": 0.1})


def test_the_trainers_python_api_is_checked_as_its_command_line_is(tmp_path: Path):
    """train(labeled=[...]) was a raw AttributeError, and --resume with --overwrite cleared
    the run it was asked to continue: both are one line naming the option."""
    from rs_pseudolabel.students.train import train

    assert TrainArgs(labeled=tmp_path, out=tmp_path / "o", overrides="lr=1").labeled == str(
        tmp_path
    )
    for options, said in [
        ({"labeled": [str(tmp_path)]}, "--labeled must be a string or a path, got ['"),
        ({"resume": "yes"}, "--resume must be true or false, got 'yes'"),
        ({"overrides": 3}, "--set takes strings, got 3"),
        ({"device": "gpu"}, "--device must be one of auto, cpu, cuda, got 'gpu'"),
        ({"resume": True, "overwrite": True}, "--resume continues the run in --out and "),
    ]:
        with pytest.raises(UsageError, match=re.escape(said)):
            train(**{"labeled": str(tmp_path), "out": str(tmp_path / "o"), **options})
    assert not (tmp_path / "o").exists()

"""The student's parts: recipes, losses, soft targets, schedule, EMA and decoders."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from rs_pseudolabel import configs
from rs_pseudolabel.data.device import Normalizer
from rs_pseudolabel.data.errors import Drop, UsageError
from rs_pseudolabel.data.records import PSEUDO_EXT, PseudoLabel, encode_pseudo, shard_header
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
from rs_pseudolabel.students.data import LabeledDecoder, PseudoDecoder, soft_target
from rs_pseudolabel.students.ema import ModelEma, decay_at
from rs_pseudolabel.students.losses import sharpen, soft_cross_entropy, student_loss
from rs_pseudolabel.students.presets import TrainPreset
from rs_pseudolabel.students.randaugment import randaugment_ops
from rs_pseudolabel.students.train import lr_schedule, peak_lr, warmup_cosine
from rs_pseudolabel.teachers import create_model, get_config
from tests.conftest import image_bytes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --- recipes -----------------------------------------------------------------------------


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


# --- losses and targets ------------------------------------------------------------------


def test_soft_target_keeps_the_top_k_and_spreads_the_rest_over_the_other_classes():
    target = soft_target([3, 1], np.array([0.6, 0.2], np.float16), 5)
    assert torch.allclose(target, torch.tensor([0.2 / 3, 0.2, 0.2 / 3, 0.6, 0.2 / 3]), atol=1e-3)
    every = soft_target([2, 0, 1], np.array([0.5, 0.3, 0.2], np.float16), 3)
    assert torch.allclose(every, torch.tensor([0.3, 0.2, 0.5]), atol=1e-3)
    assert soft_target([1], [1.0], 4).tolist() == [0, 1, 0, 0]


def test_temperature_sharpens_and_softens():
    p = torch.tensor([[0.6, 0.3, 0.1, 0.0]])
    assert torch.equal(sharpen(p, 1.0), p)
    sharp = sharpen(p, 0.5)
    assert torch.allclose(sharp, p**2 / (p**2).sum(), atol=1e-6)
    soft = sharpen(p, 2.0)
    assert soft[0, 0] < p[0, 0] and soft[0, 3] == 0  # outside the top-k stays zero
    assert torch.allclose(sharpen(p, 0.01)[0, 0], torch.tensor(1.0))  # no 0/0 at low T


def test_soft_cross_entropy_equals_cross_entropy_on_one_hot():
    logits = torch.randn(4, 7)
    labels = torch.tensor([0, 3, 6, 2])
    one_hot = F.one_hot(labels, 7).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))


def test_student_loss_adds_ratio_times_the_pseudo_term():
    logits = torch.randn(2 + 6, 5)
    labels = torch.tensor([1, 4])
    targets = torch.softmax(torch.randn(6, 5), dim=1)
    total, labeled, pseudo = student_loss(logits, labels, targets, 3.0, 0.1, 1.0)
    expected_labeled = F.cross_entropy(logits[:2], labels, label_smoothing=0.1)
    assert torch.allclose(labeled, expected_labeled)
    assert torch.allclose(pseudo, soft_cross_entropy(logits[2:], targets))
    assert torch.allclose(total, labeled + 3.0 * pseudo)
    alone, _, none = student_loss(logits[:2], labels, None, 3.0)
    assert torch.allclose(alone, expected_labeled) and none == 0


# --- student noise -----------------------------------------------------------------------


def _op(name: str, magnitude: float):
    return next(op for op in randaugment_ops(magnitude) if op.name == name)


def _bright_pixels(img: Image.Image) -> np.ndarray:
    """(x, y) of the white pixels: the drawn bar, not the black ground or the grey fill."""
    ys, xs = np.nonzero(np.asarray(img.convert("L")) > 200)
    return np.stack([xs, ys], axis=1).astype(np.float64)


def _bar(vertical: bool, size: int = 201) -> Image.Image:
    img = Image.new("RGB", (size, size))
    box = (98, 20, 102, 180) if vertical else (20, 98, 180, 102)
    ImageDraw.Draw(img).rectangle(box, fill=(255, 255, 255))
    return img


def test_randaugment_has_the_tf_reference_strength():
    """M is a level out of 10 of the reference's ranges: at M=15 a rotation turns the image
    45 degrees and a shear slants it by 0.45 (torchvision's RandAugment: 15 and 0.15)."""
    assert get_config("rs-152").randaugment_magnitude == 15
    for _ in range(4):  # either sign
        xy = _bright_pixels(_op("Rotate", 15)(_bar(vertical=False)))
        centred = xy - xy.mean(axis=0)
        _, vectors = np.linalg.eigh(centred.T @ centred)
        dx, dy = vectors[:, -1]  # the bar's long axis
        assert abs(math.degrees(math.atan2(abs(dy), abs(dx))) - 45) < 1
        xy = _bright_pixels(_op("ShearX", 15)(_bar(vertical=True)))
        slope = np.polyfit(xy[:, 1], xy[:, 0], 1)[0]  # x against y: 0 for the upright bar
        assert abs(abs(slope) - 0.45) < 0.01
    grey = np.asarray(_op("Cutout", 15)(Image.new("RGB", (224, 224))))
    # The reference's square of 2 x 60 px at 224 px, cut where it leaves the image.
    assert 60 * 60 <= (grey == 128).all(axis=2).sum() <= 120 * 120
    ops = {op.name for op in randaugment_ops(10)}
    assert len(ops) == 16 and {"Cutout", "Invert", "SolarizeAdd"} <= ops


def test_train_preset_crops_and_augments_to_uint8_normalised_on_the_device():
    preset = TrainPreset(32, crop_scale=(0.5, 1.0), flip=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8))
    out = preset(image)
    assert out.shape == (32, 32, 3) and out.dtype == torch.uint8
    normal = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))(out[None])
    assert normal.shape == (1, 3, 32, 32) and normal.dtype == torch.float32
    assert normal.is_contiguous()  # the CPU's layout (channels-last is CUDA's)
    expected = (out.permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(normal[0], expected, atol=1e-5)


# --- schedule and EMA --------------------------------------------------------------------


def test_lr_scales_with_the_labeled_batch_and_warms_up_then_decays():
    assert peak_lr(0.1, 4096) == pytest.approx(1.6)
    lrs = [warmup_cosine(step, warmup_steps=5, total_steps=20) for step in range(20)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == 1.0 and all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))
    assert warmup_cosine(20, 5, 20) == pytest.approx(0.0)
    assert warmup_cosine(12, 5, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_a_resumed_run_given_more_epochs_takes_the_new_schedule():
    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.6)

    first = optimizer()
    scheduler = lr_schedule(first, warmup_steps=5, total_steps=20)
    for _ in range(12):
        first.step()
        scheduler.step()
    saved = first.state_dict()

    same = optimizer()  # resumed with the same epochs: the very same LR
    same.load_state_dict(saved)
    lr_schedule(same, warmup_steps=5, total_steps=20, first_step=12)
    assert same.param_groups[0]["lr"] == first.param_groups[0]["lr"]

    longer = optimizer()  # resumed with twice the epochs: the longer cosine from here on
    longer.load_state_dict(saved)
    scheduler = lr_schedule(longer, warmup_steps=5, total_steps=40, first_step=12)
    assert longer.param_groups[0]["lr"] == pytest.approx(1.6 * warmup_cosine(12, 5, 40))
    longer.step()
    scheduler.step()
    assert longer.param_groups[0]["lr"] == pytest.approx(1.6 * warmup_cosine(13, 5, 40))


def test_ema_warms_up_then_trails_the_weights():
    model = create_model("rs-mini", 3)
    ema = ModelEma(model, decay=0.9999)
    assert decay_at(0.9999, 0) == pytest.approx(0.1) and decay_at(0.9999, 10**9) == 0.9999
    initial = ema.module.fc.bias.clone()
    assert torch.equal(initial, model.fc.bias)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)  # the first step's decay, 0.1: 90% of the way to the model
    assert torch.allclose(ema.module.fc.bias, initial + 0.9)
    model.fc.bias.data.add_(1.0)
    ema.update_parameters(model)  # then 2/11 of the average stays
    assert torch.allclose(ema.module.fc.bias, (initial + 0.9) * 2 / 11 + (initial + 2) * 9 / 11)
    assert not any(p.requires_grad for p in ema.module.parameters())
    # The update count is saved with the weights, so a resumed run continues the schedule.
    resumed = ModelEma(create_model("rs-mini", 3), decay=0.9999)
    resumed.load_state_dict(ema.state_dict())
    assert int(resumed.n_averaged) == 3 and torch.equal(resumed.module.fc.bias, ema.module.fc.bias)
    assert resumed.count == 3
    ema.update_parameters(model)
    resumed.update_parameters(model)  # the same schedule, step for step
    assert torch.equal(resumed.module.fc.bias, ema.module.fc.bias)


def test_an_ema_update_reads_nothing_back_from_the_device():
    """On the meta device a tensor has no value, so any read (`int()`, `.item()`, `bool()`),
    a host sync on a GPU, raises: the update must not need one (torch's AveragedModel reads
    its counter back every step)."""
    with torch.device("meta"):
        model = create_model("rs-mini", 3)
    ema = ModelEma(model, decay=0.9999)
    for _ in range(3):
        ema.update_parameters(model)
    assert ema.count == 4 and int(ema.n_averaged) == 4


# --- decoders ----------------------------------------------------------------------------


def _identity(image):
    return torch.zeros(1)


def _pseudo(key: str, indices: list[int], probs: list[float]) -> bytes:
    label = PseudoLabel(
        key=key,
        indices=np.array(indices),
        probs=np.array(probs, np.float16),
        confidence=0.5,
        entropy=0.5,
        content_hash=b"\0" * 8,
    )
    return encode_pseudo(label)


def test_decoders_turn_bad_samples_into_reasons():
    png = image_bytes()
    labeled = LabeledDecoder(_identity, num_classes=10)
    assert labeled({"__key__": "a", "png": png, "cls": b"3"})[1] == 3
    assert labeled(shard_header(teacher="t")) is None
    reasons = {
        "no_class": {"__key__": "b", "png": png},
        "unknown_class": {"__key__": "c", "png": png, "cls": b"12"},
        "malformed_class": {"__key__": "d", "png": png, "cls": b"x"},
        "undecodable_image": {"__key__": "e", "png": b"not an image", "cls": b"1"},
        "no_image": {"__key__": "f", "cls": b"1"},
    }
    for reason, sample in reasons.items():
        drop = labeled(sample)
        assert isinstance(drop, Drop) and drop.reason == reason, (reason, drop)

    pseudo = PseudoDecoder(_identity, num_classes=10)
    _, target = pseudo({"__key__": "g", "png": png, PSEUDO_EXT: _pseudo("g", [2, 5], [0.3, 0.1])})
    assert target.shape == (10,) and target[2] == pytest.approx(0.3, abs=1e-3)
    assert target.sum() == pytest.approx(1) and target[0] == pytest.approx(0.6 / 8, abs=1e-3)
    _, one_hot = pseudo({"__key__": "h", "png": png, "cls": b"4"})
    assert one_hot[4] == 1 and one_hot.sum() == 1
    bad = {
        "unknown_class": _pseudo("i", [11], [0.9]),
        "empty_pseudo_label": _pseudo("j", [], []),
        "malformed_pseudo_label": b"\x07garbage",
    }
    for reason, payload in bad.items():
        drop = pseudo({"__key__": "k", "png": png, PSEUDO_EXT: payload})
        assert isinstance(drop, Drop) and drop.reason == reason, (reason, drop)


def test_hard_pseudo_labels_are_smoothed_as_labeled_ones_and_soft_ones_are_not():
    import torch.nn.functional as F

    from rs_pseudolabel.students.losses import soft_cross_entropy

    png = image_bytes()
    pseudo = PseudoDecoder(_identity, num_classes=10, smoothing=0.1)
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0))
    for hard in ({"cls": b"4"}, {PSEUDO_EXT: _pseudo("h", [4], [1.0])}):
        _, target = pseudo({"__key__": "h", "png": png, **hard})
        assert target[4] == pytest.approx(0.91) and target[0] == pytest.approx(0.01)
        smoothed = F.cross_entropy(logits, torch.tensor([4]), label_smoothing=0.1)
        assert soft_cross_entropy(logits, target[None]) == pytest.approx(float(smoothed))
    _, soft = pseudo({"__key__": "g", "png": png, PSEUDO_EXT: _pseudo("g", [2, 5], [0.7, 0.3])})
    assert soft[2] == pytest.approx(0.7, abs=1e-3) and soft[0] == 0


def test_a_stream_of_nothing_but_unusable_samples_is_an_error():
    from rs_pseudolabel.students.data import Failed, Loader, batches

    good = (torch.zeros(1), 1)
    drops = [Drop("s.tar", f"k{i}", "no_class") for i in range(3)]
    # Drops between usable samples are counted on the batch that follows them.
    out = list(batches([drops[0], good, drops[1], good], batch_size=1, limit=2))
    assert [d for _, _, d in out] == [{"no_class": 1}, {"no_class": 1}]
    assert [t.tolist() for _, t, _ in out] == [[1], [1]]
    # In a loader worker the error ends the stream as an item, raised by the loop as itself.
    (failed,) = list(batches(drops, batch_size=1, limit=3))
    assert isinstance(failed, Failed) and not failed.storage
    with pytest.raises(ValueError, match="3 samples in a row .* no_class in s.tar"):
        list(Loader([failed], workers=0))


def _step(micro_batch: int, batch: tuple) -> tuple[list[torch.Tensor], torch.Tensor]:
    from rs_pseudolabel.students.config import Recipe
    from rs_pseudolabel.students.train import train_step
    from tests.batches import split_batch

    torch.manual_seed(0)
    model = create_model("rs-mini", num_classes=10, drop_rate=0.0, drop_path_rate=0.0).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    recipe = Recipe(model="rs-mini", micro_batch=micro_batch, unlabeled_ratio=3.0)
    normal = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    parts, splits = split_batch(batch, micro_batch)
    loss, _, _ = train_step(model, optimizer, parts, splits, recipe, normal)
    return [p.detach().clone() for p in model.parameters()], loss


def test_micro_batches_give_the_update_of_the_whole_batch():
    """Eval-mode batch norm (its statistics are the running ones, the same for every split),
    no dropout: the only difference left is the split, so the updates must agree."""
    from rs_pseudolabel.students.train import micro_splits

    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (16,), generator=gen)
    targets = torch.softmax(torch.randn(48, 10, generator=gen), dim=1)

    def pixels(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 32, 32, 3), generator=gen, dtype=torch.uint8)

    batch = (pixels(16), labels, pixels(48), targets)
    whole, whole_loss = _step(0, batch)
    split, split_loss = _step(16, batch)  # B/4 of the 64 images: four parts
    assert len(micro_splits(16, 48, 16)) == 4
    assert all((s.stop - s.start, t.stop - t.start) == (4, 12) for s, t in micro_splits(16, 48, 16))
    assert torch.allclose(whole_loss, split_loss, rtol=1e-5)
    moved = sum(float((p - q).abs().sum()) for p, q in zip(whole, _step(0, batch)[0], strict=True))
    assert moved == 0.0  # the step is deterministic: equal updates are not luck
    for p, q in zip(whole, split, strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-4)
    # An uneven split: parts of unequal sizes, as many as there are labeled images (never
    # a part without one), still the same.
    uneven, _ = _step(7, (batch[0][:3], labels[:3], batch[2][:20], targets[:20]))
    plain, _ = _step(0, (batch[0][:3], labels[:3], batch[2][:20], targets[:20]))
    assert [(s.stop - s.start, t.stop - t.start) for s, t in micro_splits(3, 20, 7)] == [
        (1, 7), (1, 6), (1, 7),
    ]  # fmt: skip
    for p, q in zip(plain, uneven, strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-4)


def _four_class_shards(tmp_path: Path) -> list[str]:
    """Four shards of 12 small PNGs each, every image of shard k of class k."""
    from bench.fixtures import write_shard

    urls = []
    for k in range(4):
        urls.append(str(tmp_path / f"part-{k}.tar"))
        samples = [{"__key__": f"s{k}i{i}", "png": image_bytes(size=(20 + i, 16)), "cls": b"%d" % k}
                   for i in range(12)]  # fmt: skip
        write_shard(urls[-1], samples)
    return urls


def test_the_loader_cuts_each_step_in_micro_batches_that_its_workers_share(tmp_path: Path):
    """Two loader workers, each step of 8 labeled images in micro-batches of 3, 2 and 3: the
    loader's batches come in those sizes, as uint8, and in turn from the two workers (each
    reads its own half of the shards, told apart here by the class of each shard)."""
    from rs_pseudolabel.students.data import LabeledDecoder, train_loader

    urls = _four_class_shards(tmp_path)
    loader = train_loader(
        urls,
        LabeledDecoder(TrainPreset(16, flip=False, randaugment_ops=0), 4),
        [3, 2, 3],
        rank=0,
        world=1,
        first_epoch=0,
        seed=0,
        workers=2,
        shuffle_buffer=4,
    )
    got = list(itertools.islice(iter(loader), 12))
    assert [len(labels) for _, labels, _ in got] == [3, 2, 3] * 4
    assert all(
        images.dtype == torch.uint8 and images.shape[1:] == (16, 16, 3) for images, _, _ in got
    )
    halves = [set(labels.tolist()) for _, labels, _ in got]
    first, second = set().union(*halves[0::2]), set().union(*halves[1::2])
    assert first and second and not first & second and first | second <= {0, 1, 2, 3}


class _WithPid:
    """A decoder's (image, class) with the id of the process that decoded it."""

    def __init__(self, decode: LabeledDecoder) -> None:
        self.decode = decode

    def __call__(self, sample: dict | Drop) -> object:
        out = self.decode(sample)
        return ((out[0], os.getpid()), out[1]) if isinstance(out, tuple) else out


def test_training_loaders_keep_their_workers_and_each_epoch_its_data(tmp_path: Path):
    """A training loader started once serves epoch after epoch from the same two worker
    processes, and its epochs 1 and 2 (augmentation included) are those of a loader started
    at epoch 1, as a resumed run starts it."""
    from rs_pseudolabel.students.data import train_loader

    urls = _four_class_shards(tmp_path)
    decode = _WithPid(LabeledDecoder(TrainPreset(16, randaugment_magnitude=15), 4))

    def epochs(first: int, count: int) -> list[list]:
        loader = train_loader(
            urls, decode, 4, rank=0, world=1, first_epoch=first, seed=0, workers=2,
            shuffle_buffer=8,
        )  # fmt: skip
        return [list(itertools.islice(iter(loader), 6)) for _ in range(count)]

    run, resumed = epochs(0, 3), epochs(1, 2)
    pids = [{pid for (_, pids), _, _ in epoch for pid in pids.tolist()} for epoch in run]
    assert len(pids[0]) == 2 and os.getpid() not in pids[0] and pids[1] == pids[0] == pids[2]
    for ours, theirs in zip(run[1:], resumed, strict=True):
        for ((images, _), labels, _), ((others, _), other_labels, _) in zip(
            ours, theirs, strict=True
        ):
            assert torch.equal(images, others) and torch.equal(labels, other_labels)
    assert not all(
        torch.equal(a[0][0], b[0][0]) for a, b in zip(run[0], run[1], strict=True)
    )  # each epoch draws anew


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

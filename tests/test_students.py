"""The student's parts: recipes, losses, soft targets, schedule, EMA and decoders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from data.errors import Drop
from data.records import PSEUDO_EXT, PseudoLabel, encode_pseudo, shard_header
from students.config import DEFAULTS, resolve_config
from students.data import LabeledDecoder, PseudoDecoder, soft_target
from students.ema import ModelEma
from students.losses import sharpen, soft_cross_entropy, student_loss
from students.presets import TrainPreset
from students.randaugment import randaugment_ops
from students.train import peak_lr, warmup_cosine
from teachers import create_model, get_config
from tests.conftest import image_bytes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --- recipes -----------------------------------------------------------------------------


def test_every_recipe_resolves_and_names_its_model():
    recipes = sorted(p for p in CONFIGS.glob("*.yaml") if p.stem != "demo")  # demo: pipeline recipe
    assert {p.stem for p in recipes} >= {f"rs-{n}" for n in (50, 101, 152, 200, 270, 350, 420)}
    for path in recipes:
        config = resolve_config(path)
        get_config(config["model"])
        if path.stem.startswith("rs-"):
            assert config["model"] == path.stem
            assert (config["epochs"], config["batch_size"], config["lr"]) == (350, 4096, 0.1)
            assert config["weight_decay"] == 4e-5 and config["ema_decay"] == 0.9999
            # Per-model noise comes from the table unless a recipe overrides it.
            assert config["dropout"] is None and config["randaugment_magnitude"] is None
    assert resolve_config(CONFIGS / "digits.yaml")["flip"] is False


def test_flags_beat_set_which_beats_the_file(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: rs-mini\nepochs: 3\nlr: 0.2\nbatch_size: 8\n")
    config = resolve_config(recipe, ["lr=0.3", "epochs=4", "flip=false"], epochs=5)
    assert (config["lr"], config["epochs"], config["batch_size"]) == (0.3, 5, 8)
    assert config["flip"] is False
    assert resolve_config(recipe, ["crop_scale=[0.3, 1]"])["crop_scale"] == [0.3, 1.0]
    assert set(config) == set(DEFAULTS)


def test_unknown_keys_are_named(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown config key 'nope' in --set"):
        resolve_config(overrides=["nope=1"], model="rs-mini")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: rs-mini\nwarmup: 3\n")
    with pytest.raises(ValueError, match=f"'warmup' in {recipe}"):
        resolve_config(recipe)
    with pytest.raises(ValueError, match="'crop_scale'"):
        resolve_config(overrides=["crop_scale=[0, 2]"], model="rs-mini")


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


def test_train_preset_crops_augments_and_normalises():
    preset = TrainPreset(32, (0.5,) * 3, (0.25,) * 3, crop_scale=(0.5, 1.0), flip=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8))
    out = preset(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -2 and out.max() <= 2  # (x - 0.5) / 0.25 for x in [0, 1]


# --- schedule and EMA --------------------------------------------------------------------


def test_lr_scales_with_the_labeled_batch_and_warms_up_then_decays():
    assert peak_lr(0.1, 4096) == pytest.approx(1.6)
    lrs = [warmup_cosine(step, warmup_steps=5, total_steps=20) for step in range(20)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == 1.0 and all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))
    assert warmup_cosine(20, 5, 20) == pytest.approx(0.0)
    assert warmup_cosine(12, 5, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_ema_warms_up_then_trails_the_weights():
    model = create_model("rs-mini", 3)
    ema = ModelEma(model, decay=0.9999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**9) == 0.9999
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = ema.module.fc.bias.clone()
    ema.update(model, step=0)  # decay 0.1: 90% of the way to the model
    assert torch.allclose(ema.module.fc.bias, before + 0.9)
    assert not any(p.requires_grad for p in ema.module.parameters())


# --- decoders ----------------------------------------------------------------------------


def _identity(image):
    return torch.zeros(1)


def _pseudo(key: str, indices: list[int], probs: list[float]) -> bytes:
    label = PseudoLabel(key, np.array(indices), np.array(probs, np.float16), 0.5, 0.5, b"\0" * 8)
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


def test_a_stream_of_nothing_but_unusable_samples_is_an_error():
    from students.data import skip_drops

    good = (torch.zeros(1), 1)
    drops = [Drop("s.tar", f"k{i}", "no_class") for i in range(3)]
    assert list(skip_drops([drops[0], good, drops[1], good], limit=2)) == [good, good]
    with pytest.raises(ValueError, match="3 samples in a row .* no_class in s.tar"):
        list(skip_drops(drops, limit=3))

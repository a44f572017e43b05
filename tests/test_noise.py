"""The student's input noise: RandAugment at the TF reference's strength, the crop and the uint8
images normalised on the device."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from rs_pseudolabel.data.device import Normalizer
from rs_pseudolabel.students.presets import TrainPreset
from rs_pseudolabel.students.randaugment import randaugment_ops
from rs_pseudolabel.teachers import get_config


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

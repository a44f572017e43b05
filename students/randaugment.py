"""RandAugment as the ResNet-RS and Noisy Student papers ran it: the TF reference's op set and
magnitude scale (`distort_image_with_randaugment` in tensorflow/tpu's autoaugment.py).

The paper's M is a level out of 10 on that scale: at M=15 a rotation turns the image by 45
degrees and a shear moves it by 0.45, three times what torchvision's 31-bin `RandAugment`
does at the same number. The ops are timm's (`timm.data.auto_augment`), which follows the
same reference level for level once its magnitude cap is raised to M; Cutout, which timm
leaves out, is added here. Where this still departs from the reference:

- translations are a fraction of the image (0.45 at M=10), the reference's 100 px of a
  224-px image, so the op means the same at every resolution; Cutout scales the same way;
- SolarizeAdd adds at most 128 (timm's cap), the reference 165 at M=15;
- rotations and shears resample bilinearly, the reference with nearest neighbours.

As in the reference, each of the N layers picks one of the 16 ops uniformly (with
replacement) and always applies it; timm's default of applying it with probability 0.5 would
halve the noise.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw
from timm.data.auto_augment import AugmentOp, RandAugment

MAX_LEVEL = 10.0  # the reference's level denominator: M / 10 of each op's full range
FILL = (128, 128, 128)  # the reference's grey for pixels an op uncovers
CUTOUT_FRACTION = 40 / 224  # the reference's cutout_const (40 px) at its 224-px images

# The reference's ops, by timm's names; translations relative to the image (see above).
TF_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "SolarizeAdd",
)


class Cutout:
    """The reference's Cutout: a grey square of side 2 * pad at a uniform random centre, cut
    where it leaves the image; pad = M / 10 * 40 px at 224 px, scaled to the image size."""

    name = "Cutout"

    def __init__(self, magnitude: float) -> None:
        self.magnitude = magnitude

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        pad = int(self.magnitude / MAX_LEVEL * CUTOUT_FRACTION * min(width, height))
        if pad <= 0:
            return img
        cy, cx = random.randrange(height), random.randrange(width)
        img = img.copy()
        box = (
            max(0, cx - pad),
            max(0, cy - pad),
            min(width, cx + pad) - 1,
            min(height, cy + pad) - 1,
        )
        ImageDraw.Draw(img).rectangle(box, fill=FILL)
        return img


def randaugment_ops(magnitude: float) -> list:
    """The 16 ops at magnitude M on the reference's scale (level M out of 10, not capped)."""
    hparams = {
        "img_mean": FILL,
        "interpolation": Image.Resampling.BILINEAR,
        "magnitude_max": max(magnitude, MAX_LEVEL),
    }
    ops: list = [AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams) for name in TF_OPS]
    return [*ops, Cutout(magnitude)]


def tf_randaugment(num_ops: int, magnitude: float) -> RandAugment:
    """PIL image -> PIL image with `num_ops` random ops of the reference at magnitude M."""
    return RandAugment(randaugment_ops(magnitude), num_layers=num_ops)

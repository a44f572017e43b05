"""Image transforms of the student: Noisy Student's input noise for training, the teacher's
own preprocessing for evaluation.

Training runs in the loader workers on PIL images at the training size: RandomResizedCrop
first, so every later step touches only the cropped pixels, then an optional flip and
RandAugment on the reference's scale (`students.randaugment`). The result stays uint8 (a
quarter of float32's bytes between processes and to the GPU) and is normalised where the
model runs (`teachers.inference.Normalizer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from rs_pseudolabel.students.config import Recipe
from rs_pseudolabel.students.randaugment import tf_randaugment
from rs_pseudolabel.teachers.checkpoint import run_info
from rs_pseudolabel.teachers.inference import eval_pixels
from rs_pseudolabel.teachers.registry import ModelConfig


class TrainPreset:
    """PIL image -> uint8 HWC tensor with the student's input noise."""

    def __init__(
        self,
        size: int,
        interpolation: str = "bicubic",
        crop_scale: Sequence[float] = (0.08, 1.0),
        flip: bool = True,
        randaugment_ops: int = 2,
        randaugment_magnitude: float = 10,
    ) -> None:
        mode = InterpolationMode(interpolation)
        steps: list[Callable] = [
            T.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=mode, antialias=True)
        ]
        if flip:
            steps.append(T.RandomHorizontalFlip())
        if randaugment_ops > 0:
            steps.append(tf_randaugment(randaugment_ops, randaugment_magnitude))
        self.transform = T.Compose(steps)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(self.transform(image), dtype=np.uint8))


def train_preset(cfg: ModelConfig, recipe: Recipe) -> Callable[[Image.Image], torch.Tensor]:
    """The student's input noise for a model of the table under a resolved recipe; with
    `train_crop: center` none: the very pixels evaluation at `image_size` sees (resize,
    centre crop), which is what Noisy Student fine-tunes on."""
    if recipe.train_crop == "center":
        return eval_pixels(run_info(cfg.name, 1, None, eval_size=recipe.image_size))
    return TrainPreset(
        size=recipe.image_size,
        interpolation=cfg.interpolation,
        crop_scale=recipe.crop_scale,
        flip=recipe.flip,
        randaugment_ops=recipe.randaugment_ops,
        randaugment_magnitude=recipe.randaugment_magnitude,
    )

"""Running a teacher: its eval preprocessing, and batched prediction of probabilities and
embeddings in one forward pass.

The teacher is un-noised (Noisy Student): eval mode, resize-and-center-crop at its eval
resolution, softmax at temperature 1; sharpening, if any, belongs to the student's loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from data.errors import UsageError
from teachers.checkpoint import TeacherInfo


def resolve_device(device: str) -> str:
    """`--device` (auto, cpu, cuda) decided where the model runs (a Beam worker, a training
    process), never on the machine that only launches the job: "auto" is CUDA when this
    process sees a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but this worker sees no CUDA device")
    return device


def _transform(
    image: Image.Image,
    resize: int,
    crop: int,
    interpolation: InterpolationMode,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = F.center_crop(F.resize(image, [resize], interpolation, antialias=True), [crop])
    pixels = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    return F.normalize(pixels, list(mean), list(std))


def eval_transform(info: TeacherInfo) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float CHW tensor at the teacher's eval resolution: shorter side
    resized to eval_size / crop_pct, center crop eval_size. A partial of a module function,
    so Beam can pickle it to its workers."""
    return partial(
        _transform,
        resize=math.floor(info.eval_size / info.crop_pct),
        crop=info.eval_size,
        interpolation=InterpolationMode(info.interpolation),
        mean=info.mean,
        std=info.std,
    )


class Predictor:
    """Probabilities and pooled features of a batch from one forward pass.

    On CUDA the model runs channels-last under bf16 autocast (the fast path of tensor
    cores); outputs always come back as float32 on the CPU, ready to be summarised.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        if self.on_cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.classifier = self.model.get_classifier()

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [N, classes], features [N, D]) for a normalised [N, 3, H, W] batch."""
        x = batch.to(self.device, non_blocking=True)
        if self.on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_cuda):
            features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            logits = self.classifier(features)
        probs = logits.float().softmax(dim=1)
        return probs.cpu(), features.float().cpu()

"""Running a teacher: its eval preprocessing, and batched prediction of probabilities and
embeddings in one forward pass.

The teacher is un-noised (Noisy Student): eval mode, resize-and-center-crop at its eval
resolution, softmax at temperature 1; sharpening, if any, belongs to the student's loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import nn

from rs_pseudolabel.data.decode import EvalCrop
from rs_pseudolabel.teachers.checkpoint import TeacherInfo


def eval_crop(info: TeacherInfo) -> EvalCrop:
    """The teacher's eval resize and center crop: shorter side to eval_size / crop_pct, then
    eval_size square."""
    return EvalCrop(math.floor(info.eval_size / info.crop_pct), info.eval_size, info.interpolation)


def _pixels(image: Image.Image, crop: EvalCrop) -> torch.Tensor:
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.asarray(crop(image)).copy())


def eval_pixels(info: TeacherInfo) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> uint8 HWC tensor at the teacher's eval resolution (shorter side resized
    to eval_size / crop_pct, center crop eval_size), for a `Normalizer` on the model's
    device. A partial of a module function, so Beam and loader workers can pickle it."""
    return partial(_pixels, crop=eval_crop(info))


class Predictor:
    """Probabilities and pooled features of a batch from one forward pass.

    On CUDA the body runs channels-last under bf16 autocast (the fast path of tensor cores);
    the classifier and the softmax run in float32, since logits rounded to bf16 move about
    one sample in nine to another 0.01 confidence bin. cuDNN's algorithm search
    (`cudnn.benchmark`) is a process-wide switch, so it is left to the command: label turns
    it on, the trainer's validation keeps the trainer's choice. `compile` puts the body
    through `torch.compile` (True, or a backend) with the batch dimension dynamic from the
    first call, so the full batches and a shard's shorter last one share one compilation
    (a batch of a single image, which Dynamo always specialises, compiles apart).
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        compile: bool | str | Callable = False,
    ) -> None:
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        if self.on_cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.classifier = self.model.get_classifier()
        self.compiled = None
        if compile:
            backend = "inductor" if compile is True else compile
            self.compiled = torch.compile(self._body, backend=backend)

    @property
    def features(self) -> int:
        """The pooled feature size, read from the model (no forward pass, no compilation)."""
        return self.model.num_features

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features of `x`: compiled when asked, the batch dimension dynamic."""
        if self.compiled is None:
            return self._body(x)
        if len(x) > 1:  # Dynamo specialises sizes 0 and 1: a batch of one compiles apart
            torch._dynamo.maybe_mark_dynamic(x, 0)
        return self.compiled(x)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [N, classes], features [N, D]), float32 on the device, for a normalised
        [N, 3, H, W] batch (anywhere)."""
        x = batch.to(self.device, non_blocking=True)
        if self.on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.on_cuda):
            features = self.body(x)
        features = features.float()
        return self.classifier(features).softmax(dim=1), features

    def predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, brought back to the CPU, ready to be summarised there."""
        probs, features = self.forward(batch)
        return probs.cpu(), features.cpu()

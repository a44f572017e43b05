"""An exponential moving average of the student's weights: the model evaluated and exported.

ResNet-RS keeps an EMA at 0.9999. With a fixed decay a short run would average mostly its
random initialisation, so the decay warms up as min(decay, (1 + step) / (10 + step)), the
schedule of TensorFlow's ExponentialMovingAverage with `num_updates`: about 0.9 at first,
0.99 after a thousand steps, the full decay only after tens of thousands.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """A frozen copy of a model whose floating-point tensors (weights and batch-norm
    statistics) trail the model's; integer buffers (batch counters) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        averaged, copied = [], []
        for ema_value, value in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema_value.is_floating_point():
                averaged.append((ema_value, value))
            else:
                copied.append((ema_value, value))
        if averaged:
            torch._foreach_lerp_([e for e, _ in averaged], [v for _, v in averaged], weight)
        for ema_value, value in copied:
            ema_value.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

"""An exponential moving average of the student's weights: the model evaluated and exported.

ResNet-RS keeps an EMA at 0.9999. With a fixed decay a short run would average mostly its
random initialisation, so the decay warms up as min(decay, (1 + step) / (10 + step)), the
schedule of TensorFlow's ExponentialMovingAverage with `num_updates`: about 0.9 at first,
0.99 after a thousand steps, the full decay only after tens of thousands.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def decay_at(decay: float, step: int) -> float:
    """The decay of the average's update after optimizer step `step` (0 for the first)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def _update(
    averaged: list[torch.Tensor],
    current: list[torch.Tensor],
    num_averaged: torch.Tensor,
    decay: float,
) -> None:
    """AveragedModel's `multi_avg_fn`, called once per device and dtype group: floating-point
    tensors (weights and batch-norm statistics) trail the model, integers (batch counters)
    are copied."""
    if averaged[0].is_floating_point():
        step = int(num_averaged) - 1
        torch._foreach_lerp_(averaged, current, 1.0 - decay_at(decay, step))
    else:
        torch._foreach_copy_(averaged, current)


class ModelEma(AveragedModel):
    """torch's AveragedModel over weights and buffers, with the warming-up decay above; call
    `update_parameters(model)` after every optimizer step. Its state dict holds the update
    count, so a resumed run continues the same schedule."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=partial(_update, decay=decay), use_buffers=True)
        self.module.eval().requires_grad_(False)
        # The copy of the initial weights is the average's first value, as in TensorFlow;
        # from a count of 0, AveragedModel would replace it by the weights after one step.
        self.n_averaged.fill_(1)

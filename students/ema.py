"""An exponential moving average of the student's weights: the model evaluated and exported.

ResNet-RS keeps an EMA at 0.9999. With a fixed decay a short run would average mostly its
random initialisation, so the decay warms up as min(decay, (1 + step) / (10 + step)), the
schedule of TensorFlow's ExponentialMovingAverage with `num_updates`: 0.1 at the first
step, 0.9 after eighty, 0.99 after a thousand, the full decay only after tens of thousands.

The update reads nothing back from the device: its step count is a Python int, where
torch's AveragedModel copies its counter tensor to the device and the decay rule read it
back with `int()`, two or three host syncs in every training step.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def decay_at(decay: float, step: int) -> float:
    """The decay of the average's update after optimizer step `step` (0 for the first)."""
    return min(decay, (1 + step) / (10 + step))


class ModelEma(AveragedModel):
    """torch's AveragedModel over weights and buffers (its state dict, so checkpoints keep
    their keys), with the warming-up decay above; call `update_parameters(model)` after
    every optimizer step. The state dict holds the update count, so a resumed run continues
    the same schedule."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.module.eval().requires_grad_(False)
        self.decay = decay
        # The copy of the initial weights is the average's first value, as in TensorFlow;
        # from a count of 0, AveragedModel would replace it by the weights after one step.
        self.count = 1
        self.n_averaged.fill_(self.count)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Floating-point tensors (weights, batch-norm statistics) trail the model by the
        decay of this step; integers (batch counters) are copied. No tensor is read."""
        trail, lead, copies, sources = [], [], [], []
        pairs = zip(
            chain(self.module.parameters(), self.module.buffers()),
            chain(model.parameters(), model.buffers()),
            strict=True,
        )
        for averaged, current in pairs:
            if averaged.is_floating_point():
                trail.append(averaged)
                lead.append(current.detach())
            else:
                copies.append(averaged)
                sources.append(current.detach())
        torch._foreach_lerp_(trail, lead, 1.0 - decay_at(self.decay, self.count - 1))
        if copies:
            torch._foreach_copy_(copies, sources)
        self.count += 1
        self.n_averaged.fill_(self.count)  # a CPU tensor, kept for the state dict

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.count = int(self.n_averaged)  # read once, when a run resumes
        return result

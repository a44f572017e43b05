"""The LR schedule (scaled, warmed up, cosine; resumed with more epochs) and the EMA of the
weights."""

from __future__ import annotations

import math

import pytest
import torch

from rs_pseudolabel.students.ema import ModelEma, decay_at
from rs_pseudolabel.students.train import lr_schedule, peak_lr, warmup_cosine
from rs_pseudolabel.teachers import create_model


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

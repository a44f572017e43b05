"""What a student learns from: soft targets from the stored top-k, temperature, the losses of
labeled and pseudo-labeled images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rs_pseudolabel.students.data import soft_target
from rs_pseudolabel.students.losses import sharpen, soft_cross_entropy, student_loss


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

"""One seed per (seed, epoch, rank) for every generator the trainer draws from."""

from __future__ import annotations

import random

import numpy as np
import torch
from webdataset.utils import make_seed


def seed_everything(*parts: int) -> None:
    """Seed torch, Python and NumPy from (seed, epoch, rank): the noise of an epoch (dropout,
    stochastic depth, main-process augmentation, whose RandAugment draws its ops from NumPy)
    depends on where it is, not on what ran before, so a resumed run draws what the
    uninterrupted one drew."""
    seed = make_seed(*parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

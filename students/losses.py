"""The Noisy Student objective: supervised cross-entropy plus soft cross-entropy on pseudo-labels.

The teacher's distribution is stored at temperature 1 (SPEC: sharpening belongs to training);
the temperature is applied here, to the target: p^(1/T) renormalised, so T < 1 sharpens the
teacher's soft label towards its top-1 and T > 1 softens it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sharpen(target: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) renormalised over the last dimension; T = 1 returns `target` as it is."""
    if temperature == 1.0:
        return target
    # In log space, so small probabilities raised to a large power do not underflow to 0/0;
    # classes at zero (the rest of a one-hot target) stay at exactly zero.
    log_p = torch.where(target > 0, target.log(), float("-inf"))
    return F.softmax(log_p / temperature, dim=-1)


def soft_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over the batch of -sum_c q_c log softmax(logits)_c, q the (sharpened) target."""
    q = sharpen(target.float(), temperature)
    return -(q * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def student_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pseudo_targets: torch.Tensor | None,
    ratio: float,
    label_smoothing: float = 0.1,
    temperature: float = 1.0,
    shares: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, labeled, pseudo) for one forward pass over the labeled batch followed by the
    pseudo-labeled batch: total = CE(labeled, smoothed) + ratio * soft CE(pseudo).

    With both terms batch means, the total weighs every image alike, labeled or not, and
    is (1 + ratio) times the mean loss of the concatenated batch. For a micro-batch,
    `shares` are its shares of the step's labeled and pseudo-labeled images: each term is
    weighted by its share, so the micro-batches' totals add up to the whole step's loss (and
    their gradients to its gradient). A part with no images of a kind adds nothing for it.
    """
    n = labels.shape[0]
    zero = torch.zeros((), device=logits.device)
    labeled = (
        F.cross_entropy(logits[:n].float(), labels, label_smoothing=label_smoothing) if n else zero
    )
    if pseudo_targets is None or pseudo_targets.shape[0] == 0:
        return shares[0] * labeled, labeled.detach(), zero
    pseudo = soft_cross_entropy(logits[n:], pseudo_targets, temperature)
    total = shares[0] * labeled + ratio * shares[1] * pseudo
    return total, labeled.detach(), pseudo.detach()

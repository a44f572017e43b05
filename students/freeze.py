"""Layers that keep their weights while the rest trains: Noisy Student's fine-tune keeps the
stem and the first blocks of the student as they are (`--fix_layer_num` in the official
code), batch-norm statistics included.

A frozen layer takes no gradient and no optimizer update, and stays in eval mode through
every `model.train()`: its batch norms normalise with the statistics they were given and
update none of them, and its dropout and stochastic depth are off. The EMA's average of an
unchanged tensor is that tensor (a lerp towards itself), so the exported weights keep it too.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from rs_pseudolabel.data.errors import UsageError

NOTHING = "none"  # the recipe's freeze_through when no layer is frozen


def freeze_through(model: nn.Module, last: str) -> list[nn.Module]:
    """Freeze `model`'s top-level children from the first through the one named `last`
    (in the order the model declares them); returns them, for `keep_frozen`."""
    if last == NOTHING:
        return []
    children = list(model.named_children())
    names = [name for name, _ in children]
    if last not in names:
        raise UsageError(
            f"config key 'freeze_through' names {last!r}, which is not a top-level layer of "
            f"the model; its layers, in order: {', '.join(names)}"
        )
    frozen = [module for _, module in children[: names.index(last) + 1]]
    for module in frozen:
        module.requires_grad_(False)
    keep_frozen(frozen)
    return frozen


def keep_frozen(frozen: Sequence[nn.Module]) -> None:
    """Put the frozen layers back in eval mode: call after every `model.train()`."""
    for module in frozen:
        module.eval()

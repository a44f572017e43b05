"""A whole step's batch, held in memory, cut into the micro-batches the trainer's loaders
would give it: how the tests call `train_step` without shards."""

from __future__ import annotations

from rs_pseudolabel.students.train import Part, Splits, micro_splits


def split_batch(batch: Part, micro_batch: int | None) -> tuple[list[Part], Splits]:
    """(images, labels, pseudo_images, targets) as `train_step`'s parts and splits."""
    images, labels, pseudo_images, targets = batch
    m = 0 if pseudo_images is None else len(pseudo_images)
    splits = micro_splits(len(labels), m, micro_batch)
    parts = [
        (images[lab], labels[lab], None if not m else pseudo_images[pse],
         None if not m else targets[pse])
        for lab, pse in splits
    ]  # fmt: skip
    return parts, splits

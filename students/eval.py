"""`pipeline eval`: top-1 and top-5 of a run directory (or any teacher) on labeled shards.

The model runs through the same `Predictor` and eval transform as `pipeline label`, so the
accuracy reported is the accuracy of the labels it would write. Samples that cannot be used
(undecodable image, missing or unknown class) are left out of the accuracy and counted in
`dropped`. The trainer evaluates its EMA every epoch with the same `evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rs_pseudolabel.data.classes import read_class_names
from rs_pseudolabel.data.device import Normalizer, resolve_device
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.progress import progress_bar
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.students.data import eval_loader
from rs_pseudolabel.students.distributed import all_reduce_sum
from rs_pseudolabel.teachers import Predictor, TeacherInfo, load_teacher
from rs_pseudolabel.teachers.inference import eval_pixels


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    info: TeacherInfo,
    distributed: bool = False,
    progress: bool = False,
    source: str = "the evaluation data",
) -> dict:
    """{"top1", "top5", "samples", "dropped"} over (uint8 images, labels, drops) batches,
    normalised on the device with the model's `info`; with `distributed`, summed over all
    ranks, each rank having read its own part of the shards. Data with no sample to score
    (unlabeled shards, say) is refused: a top-1 of 0 on 0 samples reads as a result."""
    device = torch.device(device)
    predictor = Predictor(model, device)
    normal = Normalizer(info.mean, info.std, device)
    counts = torch.zeros(4, dtype=torch.float64)  # top-1 hits, top-5 hits, samples, dropped
    with progress_bar(desc="eval", unit="img", disable=not progress, leave=False) as bar:
        for images, labels, drops in loader:
            dropped = sum(drops.values())
            counts[3] += dropped
            if labels.numel():
                probs, _ = predictor.predict(normal(images))
                hits = probs.topk(min(5, probs.shape[1]), dim=1).indices == labels[:, None]
                counts[:3] += torch.tensor(
                    [hits[:, 0].sum(), hits.any(dim=1).sum(), labels.numel()], dtype=torch.float64
                )
            bar.update(labels.numel() + dropped)
    if distributed:
        counts = all_reduce_sum(counts.to(device)).cpu()
    top1, top5, samples, dropped = counts.tolist()
    if not samples:
        raise UsageError(
            f"{source}: none of its {int(dropped)} samples could be scored (no class, or "
            "unreadable; `pipeline stats` counts them by reason): evaluation needs labeled shards"
        )
    return {
        "top1": top1 / samples,
        "top5": top5 / samples,
        "samples": int(samples),
        "dropped": int(dropped),
    }


def evaluate_run(
    run_dir: str,
    data_spec: str,
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Accuracy of a run directory's model (or any `load_teacher` source) on labeled shards,
    refused when the shards' classes.json names other classes than the model was trained on."""
    device = resolve_device(device)
    urls = expand_shards(data_spec)
    model, info = load_teacher(run_dir)
    names = read_class_names(urls)
    if names is not None and info.class_names is not None and names != info.class_names:
        raise UsageError(
            f"{data_spec} holds classes {names[:5]}... but {run_dir} was trained on "
            f"{info.class_names[:5]}...: class ids would be scored against the wrong classes"
        )
    loader = eval_loader(urls, eval_pixels(info), info.num_classes, batch_size, workers=workers)
    metrics = evaluate(model, loader, device, info, progress=progress, source=data_spec)
    return {**metrics, "eval_size": info.eval_size}

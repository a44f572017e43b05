"""Student step time with the real shard loader over step time with batches in memory.

    python bench/bench_train.py [--model rs-50] [--batch-size 16] [--steps 12] [--repeats 3]

The same model, optimizer, schedule and EMA step (`students.train.train_one_epoch`), fed
either by the WebDataset loader (224-px JPEG shards decoded and augmented in a loader
worker) or by batches the same loader made beforehand, alternated; the ratio of medians.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import write_corpus  # noqa: E402
from bench.record import append  # noqa: E402
from rs_pseudolabel.data.device import Normalizer  # noqa: E402
from rs_pseudolabel.students.config import resolve_recipe  # noqa: E402
from rs_pseudolabel.students.data import LabeledDecoder, train_loader  # noqa: E402
from rs_pseudolabel.students.ema import ModelEma  # noqa: E402
from rs_pseudolabel.students.presets import train_preset  # noqa: E402
from rs_pseudolabel.students.train import (  # noqa: E402
    lr_schedule,
    micro_splits,
    mixed_parts,
    param_groups,
    train_one_epoch,
)
from rs_pseudolabel.teachers import create_model, get_config  # noqa: E402

CLASSES = 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="rs-50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    urls = write_corpus(str(work / "shards"), 512, shard_size=64, classes=CLASSES)
    recipe = resolve_recipe(
        "imagenet",
        [f"workers={args.workers}", "shuffle_buffer=256"],
        model=args.model,
        batch_size=args.batch_size,
    )
    table = get_config(args.model)
    loader = train_loader(
        urls,
        LabeledDecoder(train_preset(table, recipe), CLASSES),
        args.batch_size,
        rank=0,
        world=1,
        first_epoch=0,
        seed=0,
        workers=args.workers,
        shuffle_buffer=256,
    )
    torch.manual_seed(0)
    model = create_model(args.model, CLASSES)
    optimizer = torch.optim.SGD(param_groups(model, recipe.weight_decay), lr=0.01, momentum=0.9)
    scheduler = lr_schedule(optimizer, warmup_steps=1, total_steps=10**6)
    ema = ModelEma(model, recipe.ema_decay)
    step = partial(
        train_one_epoch,
        model,
        optimizer,
        scheduler,
        ema,
        steps=args.steps,
        splits=micro_splits(args.batch_size, 0, None),
        recipe=recipe,
        normal=Normalizer(table.mean, table.std, torch.device("cpu")),
    )

    real = mixed_parts(iter(loader), None)
    held = list(itertools.islice(real, args.steps))  # the loader's own batches, kept in memory
    step(held)  # warm-up: allocator, kernels, loader workers
    loader_s, memory_s, waits = [], [], []
    for _ in range(args.repeats):
        tick = time.perf_counter()
        waits.append(step(real)["data_wait"])
        loader_s.append((time.perf_counter() - tick) / args.steps)
        tick = time.perf_counter()
        step(iter(held))
        memory_s.append((time.perf_counter() - tick) / args.steps)
    ratio = statistics.median(loader_s) / statistics.median(memory_s)
    append(
        f"student step: shard loader vs in-memory batches ({args.model} at {table.train_size} px, batch {args.batch_size})",
        f"python bench/bench_train.py --model {args.model} --batch-size {args.batch_size} --steps {args.steps} --repeats {args.repeats}",
        [
            "| measure | value |",
            "|---|---|",
            f"| step s with the shard loader (runs) | {', '.join(f'{s:.2f}' for s in loader_s)} |",
            f"| step s with in-memory batches (runs) | {', '.join(f'{s:.2f}' for s in memory_s)} |",
            f"| **loader / in-memory, ratio of medians** | **{ratio:.3f}** (target <= 1.05) |",
            f"| loader workers | {args.workers} (JPEG decode, random-resized crop, flip, RandAugment) |",
            f"| images/s with the shard loader | {args.batch_size / statistics.median(loader_s):.2f} |",
            f"| share of the step waiting for data, loader-fed (runs) | {', '.join(f'{w:.1%}' for w in waits)} (goal <= 5%) |",
        ],
        "train",
        {
            "model": args.model,
            "train_size": table.train_size,
            "ratio_loader_over_memory": ratio,
            "images_per_s": args.batch_size / statistics.median(loader_s),
            "data_wait": statistics.median(waits),
        },
    )


if __name__ == "__main__":
    main()

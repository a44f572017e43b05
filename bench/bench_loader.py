"""The student's loader against a bare loop doing the same decode and augmentation.

    python bench/bench_loader.py [--images 3072] [--repeats 5] [--workers 1]

The ImageNet recipe's input noise (RandomResizedCrop, flip, RandAugment at the model's
magnitude, uint8 out) at rs-50's 160 px and rs-152's 256 px, on JPEGs of 384 px (about an
ImageNet photo's size). The bare loop reads the shards, decodes and augments every image in
one process, nothing else; the loader is `students.data.train_loader` with `--workers`
worker processes, its batches taken by this process (shuffle buffer, drops, collation, the
copy between processes included). Figures: images/s per worker core, each side, and their
ratio (goal >= 0.95), medians of alternated runs. The machine needs a core for the process
that takes the batches beside the workers' (2 cores: 1 worker).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import write_corpus  # noqa: E402
from bench.record import append  # noqa: E402
from data.decode import decode_image, find_image  # noqa: E402
from data.read import iter_samples  # noqa: E402
from students.config import resolve_recipe  # noqa: E402
from students.data import LabeledDecoder, train_loader  # noqa: E402
from students.presets import train_preset  # noqa: E402
from teachers import get_config  # noqa: E402

CASES = (("rs-50", 160), ("rs-152", 256))  # the table's training sizes
BATCH = 64
CLASSES = 1000


def bare(urls: list[str], preset) -> float:
    """Images/s of one process reading, decoding and augmenting every image."""
    start, count = time.perf_counter(), 0
    for sample in iter_samples(urls, lambda drop: None):
        found = find_image(sample)
        if found is None:
            continue
        image, _ = decode_image(found[1])
        preset(image)
        count += 1
    return count / (time.perf_counter() - start)


def loaded(urls: list[str], preset, images: int, workers: int, epoch: int) -> float:
    """Images/s per worker of the student's loader, from its first batch to its last (the
    workers' start is left out: the trainer's loaders start once a run)."""
    loader = train_loader(
        urls,
        LabeledDecoder(preset, CLASSES),
        BATCH,
        rank=0,
        world=1,
        first_epoch=epoch,
        seed=0,
        workers=workers,
        shuffle_buffer=256,
    )
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    steps = images // BATCH - 1
    for _ in itertools.islice(batches, steps):
        pass
    return steps * BATCH / (time.perf_counter() - start) / workers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    urls = write_corpus(str(work / "shards"), args.images, shard_size=128, size=384, classes=10)

    rows = [
        "| model, train px | bare loop img/s (runs) | loader img/s per worker (runs) "
        "| **loader / bare** |",
        "|---|---|---|---|",
    ]
    figures = {}
    for model, size in CASES:
        recipe = resolve_recipe("imagenet", model=model)
        preset = train_preset(get_config(model), recipe)
        bare_runs, loader_runs = [], []
        for i in range(args.repeats):
            bare_runs.append(bare(urls, preset))
            loader_runs.append(loaded(urls, preset, args.images, args.workers, i))
        ratio = statistics.median(loader_runs) / statistics.median(bare_runs)
        figures[f"{model}@{size}"] = {"bare": bare_runs, "loader": loader_runs, "ratio": ratio}
        rows.append(
            f"| {model}, {size} (RandAugment M={recipe.randaugment_magnitude:g}) "
            f"| {', '.join(f'{r:.0f}' for r in bare_runs)} "
            f"| {', '.join(f'{r:.0f}' for r in loader_runs)} | **{ratio:.2f}** |"
        )
    rows += [
        "",
        f"{args.images} JPEGs of 384 px in shards of 128, batch {BATCH}, {args.workers} "
        "worker(s). Goal: loader / bare >= 0.95.",
    ]
    append(
        "student loader: images/s per worker core against a bare decode + augment loop",
        f"python bench/bench_loader.py --images {args.images} --repeats {args.repeats} "
        f"--workers {args.workers}",
        rows,
        "loader",
        figures,
    )


if __name__ == "__main__":
    main()

"""The student's loader against a bare loop doing the same decode and augmentation.

    python bench/bench_loader.py [--images 3072] [--repeats 5]

The ImageNet recipe's input noise (RandomResizedCrop, flip, RandAugment at the magnitude of
the resolution, uint8 out) at rs-50's 160 px and rs-152's 256 px, on JPEGs of 384 px (about
an ImageNet photo's size). The bare loop reads the shards, decodes and augments every image,
nothing else; the loader is `students.data.train_loader` with one worker process, its
batches taken by this process (shuffle buffer, drops, collation, the copy between processes
included). The two run at the same time, each on a core of its own (this process's main
thread runs the bare loop, a thread of it drains the loader), over the same seconds: this
machine's speed drifts by 10% between runs a minute apart, which sequential runs would
charge to one side or the other, while side by side it falls on both alike. Figures:
images/s per core, each side, and their ratio per run (goal >= 0.95), and the median ratio.
The thread that drains the loader takes its share of the bare loop's core (a few ms per
batch), so the ratio leans, by well under 1%, the loader's way. Needs 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import write_corpus  # noqa: E402
from bench.record import append  # noqa: E402
from rs_pseudolabel.data.decode import decode_image, find_image  # noqa: E402
from rs_pseudolabel.data.read import iter_samples  # noqa: E402
from rs_pseudolabel.students.config import resolve_recipe  # noqa: E402
from rs_pseudolabel.students.data import LabeledDecoder, train_loader  # noqa: E402
from rs_pseudolabel.students.presets import train_preset  # noqa: E402
from rs_pseudolabel.teachers import get_config  # noqa: E402

CASES = (("rs-50", 160), ("rs-152", 256))  # the table's training sizes
BATCH = 64
CLASSES = 1000


def side_by_side(urls: list[str], preset, images: int, epoch: int) -> tuple[float, float]:
    """(bare img/s, loader img/s) over the same seconds: the bare loop goes round the shards
    until the loader has delivered `images` more images after its first batch."""
    loader = train_loader(
        urls,
        LabeledDecoder(preset, CLASSES),
        BATCH,
        rank=0,
        world=1,
        first_epoch=epoch,
        seed=0,
        workers=1,
        shuffle_buffer=256,
    )
    batches = iter(loader)
    next(batches)  # the worker's start and first fill are left out: loaders start once a run
    steps = images // BATCH - 1
    finished: list[float] = []

    def drain() -> None:
        for _ in itertools.islice(batches, steps):
            pass
        finished.append(time.perf_counter())

    thread = threading.Thread(target=drain)
    start, count = time.perf_counter(), 0
    thread.start()
    while not finished:
        for sample in iter_samples(urls, lambda drop: None):
            found = find_image(sample)
            if found is None:
                continue
            image, _ = decode_image(found[1])
            preset(image)
            count += 1
            if finished:
                break
    bare_end = time.perf_counter()
    thread.join()
    return count / (bare_end - start), steps * BATCH / (finished[0] - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    urls = write_corpus(str(work / "shards"), args.images, shard_size=128, size=384, classes=10)

    rows = [
        "| model, train px | bare loop img/s (runs) | loader img/s, 1 worker (same runs) "
        "| ratio per run | **median loader / bare** |",
        "|---|---|---|---|---|",
    ]
    figures = {}
    for model, size in CASES:
        recipe = resolve_recipe("imagenet", model=model)
        preset = train_preset(get_config(model), recipe)
        runs = [side_by_side(urls, preset, args.images, i) for i in range(args.repeats)]
        ratios = [loader / bare for bare, loader in runs]
        ratio = statistics.median(ratios)
        figures[f"{model}@{size}"] = {"runs": runs, "ratios": ratios, "ratio": ratio}
        rows.append(
            f"| {model}, {size} (RandAugment M={recipe.randaugment_magnitude:g}) "
            f"| {', '.join(f'{b:.0f}' for b, _ in runs)} "
            f"| {', '.join(f'{x:.0f}' for _, x in runs)} "
            f"| {', '.join(f'{r:.2f}' for r in ratios)} | **{ratio:.2f}** |"
        )
    rows += [
        "",
        f"{args.images} JPEGs of 384 px in shards of 128, batch {BATCH}; both sides at once, "
        "each on a core. Goal: loader / bare >= 0.95.",
    ]
    append(
        "student loader: images/s per worker core against a bare decode + augment loop",
        f"python bench/bench_loader.py --images {args.images} --repeats {args.repeats}",
        rows,
        "loader",
        figures,
    )


if __name__ == "__main__":
    main()

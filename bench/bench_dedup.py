"""Near-copy detection against an evaluation set: recall of planted copies and false drops of
distinct images, with and without near-twins inside the evaluation set.

    python bench/bench_dedup.py [--teacher RUN_DIR] [--evals 300 1000] [--draws 20]

The images are 2x2 mosaics of real handwritten digits (distinct images that share parts,
like photos of one scene); the teacher is rs-mini trained on 200 labeled digits as the test
suite's teacher is (or the run given by --teacher). Every draw takes an evaluation set of
N mosaics, turns a share of them into near-twins of another evaluation image (1% of
images in twin pairs: ImageNet's validation set has such pairs), plants exact, recompressed
(JPEG 70), resized (48 px) and 1-px-cropped copies of 40 evaluation images in the corpus
beside 3,000 distinct mosaics, and calibrates the threshold at the default false-drop rate
both ways: the nearest other evaluation image (the earlier rule) and the nearest distinct
one (near-copies set aside by the ratio test, `pipeline.dedup`).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fixtures import write_shard  # noqa: E402
from bench.record import append  # noqa: E402
from rs_pseudolabel.data.digits import digit_png, write_digits  # noqa: E402
from rs_pseudolabel.data.records import content_hash, read_pseudo_shard  # noqa: E402
from rs_pseudolabel.pipeline import dedup  # noqa: E402
from rs_pseudolabel.pipeline.label_shard import Teacher, label_shard  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FPR = 0.005  # pipeline filter's default --dedup-fpr
PLANTED, OTHERS = 40, 3000
TILE = 64  # px per digit: 128-px images, where a 1-px crop is as slight as on a photo
EVAL_SCANS, OTHER_SCANS = range(0, 1200), range(1200, 1797)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _resized(img: Image.Image) -> bytes:
    side = img.width * 3 // 4
    return _png(img.resize((side, side), Image.Resampling.BILINEAR))


COPIES: dict[str, Callable[[Image.Image], bytes]] = {
    "exact": _png,
    "recompressed": lambda img: _jpeg(img, 70),
    "resized": _resized,  # to 3/4 of the side
    "cropped": lambda img: _png(img.crop((1, 1, img.width - 1, img.height - 1))),
}


def mosaics(count: int, seed: int, scans: range, tile: int = TILE) -> list[Image.Image]:
    """Distinct images: each a 2x2 mosaic of four real handwritten digits, drawn from
    `scans` (indices into the 1,797). Evaluation mosaics and distinct corpus mosaics use
    disjoint scans, so a distinct image never holds a quarter of an evaluation image."""
    digits = load_digits().images
    rng = np.random.default_rng(seed)
    tiles = [Image.open(io.BytesIO(digit_png(digits[i], tile))).convert("RGB") for i in scans]
    out = []
    for _ in range(count):
        canvas = Image.new("RGB", (2 * tile, 2 * tile))
        for j, i in enumerate(rng.choice(len(tiles), 4, replace=False)):
            canvas.paste(tiles[i], ((j % 2) * tile, (j // 2) * tile))
        out.append(canvas)
    return out


def embed(teacher: Teacher, blobs: list[bytes]) -> np.ndarray:
    """The stored embedding of each encoded image, written by `pipeline label --embed`'s own
    per-shard code and read back from its sidecar."""
    work = Path(tempfile.mkdtemp(prefix="embed-"))
    src = work / "src.tar"
    write_shard(str(src), [{"__key__": f"e{i:07d}", "png": b} for i, b in enumerate(blobs)])
    label_shard(str(src), "out.tar", str(work / "out"), teacher, 256, 1, True)
    labels = read_pseudo_shard(str(work / "out" / "out.tar"), lambda drop: None)
    return np.stack([label.embedding for label in labels]).astype(np.float32)


def nearest_other_threshold(index, fpr: float) -> float:
    """The earlier rule: the quantile of each evaluation image's nearest other image."""
    sims, _ = index.search(index.reconstruct_n(0, index.ntotal), 2)
    return float(np.quantile(sims[:, 1], 1 - fpr, method="higher"))


def train_teacher(out: Path) -> Path:
    from rs_pseudolabel.students.train import train

    write_digits(str(out / "digits"), labeled=200, seed=0)
    train(
        labeled=str(out / "digits" / "labeled"),
        out=str(out / "teacher"),
        model="rs-mini",
        config=str(ROOT / "configs" / "digits.yaml"),
        epochs=15,
        overrides=["epoch_samples=640", "randaugment_ops=0"],
    )
    return out / "teacher"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", help="a run directory; default: train the test's teacher")
    parser.add_argument("--evals", type=int, nargs="+", default=[300, 1000, 2000])
    parser.add_argument("--twins", type=float, nargs="+", default=[0.0, 0.01, 0.05])
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the test suite's teacher, bit for bit
    run = Path(args.teacher) if args.teacher else train_teacher(Path(tempfile.mkdtemp()))
    teacher = Teacher.load(str(run), None, "cpu")

    pool = mosaics(max(args.evals) + 500, 1, EVAL_SCANS)
    originals = [_png(img) for img in pool]
    vectors = {"original": embed(teacher, originals)}
    for kind, make in COPIES.items():
        vectors[kind] = embed(teacher, [make(img) for img in pool])
    others = embed(teacher, [_png(img) for img in mosaics(OTHERS, 2, OTHER_SCANS)])
    twin_kinds = ["recompressed", "resized", "cropped"]

    rows = [
        "| eval images | in twin pairs | rule | threshold (mean) | copies found: exact / recompressed / resized / cropped (worst draw) | distinct dropped: mean, worst |",
        "|---|---|---|---|---|---|",
    ]
    figures = []
    ratios_distinct, ratios_twin = [], []
    for n in args.evals:
        for twin_share in args.twins:
            found = {
                rule: {k: [] for k in COPIES} for rule in ("nearest other", "nearest distinct")
            }
            dropped = {rule: [] for rule in found}
            thresholds = {rule: [] for rule in found}
            for draw in range(args.draws):
                rng = np.random.default_rng(1000 * n + draw + int(1e6 * twin_share))
                chosen = rng.choice(len(pool), n, replace=False)
                matrix = vectors["original"][chosen].copy()
                pairs = round(twin_share * n / 2)
                # The last `pairs` slots become near-twins of the first `pairs` images.
                hashes = [content_hash(originals[i]) for i in chosen]
                for j in range(pairs):
                    kind = twin_kinds[j % len(twin_kinds)]
                    matrix[n - 1 - j] = vectors[kind][chosen[j]]
                    hashes[n - 1 - j] = content_hash(COPIES[kind](pool[chosen[j]]))
                keys = [f"eval{i}" for i in range(n)]
                index = dedup.EvalIndex.from_arrays(keys, hashes, matrix, None, FPR)
                if twin_share == 0.01 and n == max(args.evals):
                    distance = 1 - index.index.search(index.index.reconstruct_n(0, n), 9)[0][:, 1:]
                    ratio = distance[:, 0] / distance[:, -1]
                    twins = np.r_[np.arange(pairs), np.arange(n - pairs, n)]
                    ratios_twin += ratio[twins].tolist()
                    ratios_distinct += np.delete(ratio, twins).tolist()
                planted = chosen[rng.choice(n - pairs, PLANTED, replace=False)]  # not a twin
                digests = {
                    kind: [content_hash(make(pool[i])) for i in planted]
                    for kind, make in COPIES.items()
                }
                rules = {
                    "nearest other": nearest_other_threshold(index.index, FPR),
                    "nearest distinct": index.threshold,
                }
                for rule, threshold in rules.items():
                    thresholds[rule].append(threshold)
                    index.threshold = threshold
                    for kind in COPIES:
                        matches = index.matches(digests[kind], vectors[kind][planted])
                        found[rule][kind].append(sum(m is not None for m in matches) / PLANTED)
                    matches = index.matches([b""] * OTHERS, others)
                    dropped[rule].append(sum(m is not None for m in matches) / OTHERS)
            for rule in found:
                recall = " / ".join(
                    f"{100 * statistics.mean(v):.0f}% ({100 * min(v):.0f}%)"
                    for v in found[rule].values()
                )
                rows.append(
                    f"| {n} | {100 * twin_share:.0f}% | {rule} | "
                    f"{statistics.mean(thresholds[rule]):.3f} | {recall} | "
                    f"{100 * statistics.mean(dropped[rule]):.2f}%, {100 * max(dropped[rule]):.2f}% |"
                )
                figures.append(
                    {
                        "evals": n,
                        "twin_share": twin_share,
                        "rule": rule,
                        "threshold": statistics.mean(thresholds[rule]),
                        "recall_min": {k: min(v) for k, v in found[rule].items()},
                        "dropped_mean": statistics.mean(dropped[rule]),
                        "dropped_max": max(dropped[rule]),
                    }
                )
    if ratios_twin:
        q = np.quantile
        rows += [
            "",
            "Ratio test at 1% twins (distance to the nearest other image / to the 8th nearest), "
            f"{max(args.evals)} evaluation images: twins median {q(ratios_twin, 0.5):.2f}, "
            f"max {max(ratios_twin):.2f}; distinct images 1st percentile "
            f"{q(ratios_distinct, 0.01):.2f}, median {q(ratios_distinct, 0.5):.2f}. "
            f"A neighbour is set aside as a near-copy below {dedup.NEAR_COPY_RATIO}.",
        ]
    append(
        f"dedup: planted copies found and distinct images dropped, fpr {FPR}, {args.draws} draws",
        "python bench/bench_dedup.py " + " ".join(sys.argv[1:]),
        rows,
        "dedup",
        {"fpr": FPR, "draws": args.draws, "results": figures},
    )


if __name__ == "__main__":
    main()

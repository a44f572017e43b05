"""`pipeline filter` against a plain single-process loop doing the same work, and its memory
as the corpus grows.

    python bench/bench_filter.py [--records 20000] [--classes 100] [--repeats 3]

1. Source shards of 160-px photo-like JPEGs with aligned pseudo-label sidecars (the label
   stage's exact record format) over long-tailed classes; `pipeline filter --threshold 0
   --per-class 120` and bench/filter_plain.py (tarfile + the project's codec and rules)
   alternate as whole processes; the median of plain / filter is the figure.
2. Peak memory of the filter at 1x and 4x the records, with ten times more drops than
   keeps (small PNGs, a per-class N that keeps one record in eleven).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import photo_jpeg  # noqa: E402
from bench.fixtures import write_shard  # noqa: E402
from bench.record import append, timed  # noqa: E402
from rs_pseudolabel.data.records import PseudoLabel, content_hash, pseudo_sample, shard_header  # noqa: E402
from rs_pseudolabel.data.storage import write_json  # noqa: E402
from rs_pseudolabel.pipeline.confidence import CLASS_CONFIDENCES, conf_bins, save_histograms  # noqa: E402


def long_tailed(rng: np.random.Generator, classes: int, n: int) -> np.ndarray:
    """Class ids drawn with probability proportional to 1 / rank: a few classes are common."""
    weights = 1.0 / np.arange(1, classes + 1)
    return rng.choice(classes, n, p=weights / weights.sum())


def write_labeled_corpus(
    root: Path,
    records: int,
    classes: int,
    shard_size: int = 1000,
    seed: int = 0,
    photo_size: int | None = None,
) -> None:
    """Source shards and their sidecars, as `pipeline label` would leave them (with its
    per-class confidence counts): 160-px JPEGs with `photo_size`, else small distinct PNGs
    (cheap to make, for memory runs)."""
    rng = np.random.default_rng(seed)
    palette = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        palette.append(buf.getvalue())
    shards, by_class = 0, {}
    for shard in range(0, records, shard_size):
        name = f"part-{shard // shard_size:06d}.tar"
        n = min(shard_size, records - shard)
        keys = [f"img{shard + i:08d}" for i in range(n)]
        images = [
            photo_jpeg(rng, photo_size) if photo_size else palette[i % 64] + keys[i].encode()
            for i in range(n)
        ]
        ext = "jpg" if photo_size else "png"
        source = str(root / "src" / name)
        write_shard(source, [{"__key__": k, ext: b} for k, b in zip(keys, images, strict=True)])
        top = long_tailed(rng, classes, n)
        conf = rng.beta(5, 2, n)
        samples = [shard_header(teacher="bench@0", source=source, topk=16, embed=False)]
        for i, key in enumerate(keys):
            others = rng.choice(np.delete(np.arange(classes), top[i]), 15, replace=False)
            rest = rng.dirichlet(np.ones(15)) * (1 - conf[i])
            indices = np.concatenate([[top[i]], others])
            probs = np.concatenate([[conf[i]], np.sort(rest)[::-1]]).astype(np.float16)
            samples.append(
                pseudo_sample(
                    PseudoLabel(
                        key=key,
                        indices=indices,
                        probs=probs,
                        confidence=float(conf[i]),
                        entropy=2.0,
                        content_hash=content_hash(images[i]),
                    )
                )
            )
        write_shard(str(root / "labels" / name), samples)
        for cls, b in zip(top.tolist(), conf_bins(np.float16(conf)).tolist(), strict=True):
            by_class.setdefault(cls, Counter())[b] += 1
        shards += 1
    save_histograms(str(root / "labels" / CLASS_CONFIDENCES), by_class)
    write_json(
        str(root / "labels" / "manifest.json"),
        {
            "stage": "label",
            "state": "done",
            "fingerprint": {
                "stage": "label",
                "input": {"spec": str(root / "src"), "files": shards},
                "embed": False,
            },
            "shards": shards,
            "teacher": "bench@0",
            "args": {"teacher": "bench"},
        },
    )


def _filter(root: Path, out: Path, per_class: int) -> list[str]:
    return [
        sys.executable, "-m", "rs_pseudolabel.pipeline", "filter", "--input", str(root / "labels"),
        "--output", str(out), "--threshold", "0", "--per-class", str(per_class),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-records", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    corpus = work / "photos"
    write_labeled_corpus(corpus, args.records, args.classes, photo_size=160)
    plain = [sys.executable, str(Path(__file__).parent / "filter_plain.py")] + [
        "--input", str(corpus / "labels"), "--threshold", "0", "--per-class", str(args.per_class),
    ]  # fmt: skip
    timed([*plain, "--output", str(work / "warm")])  # the file cache and imports, once
    plain_s, filter_s = [], []
    for i in range(args.repeats):
        plain_s.append(timed([*plain, "--output", str(work / f"plain{i}")])[0])
        filter_s.append(timed(_filter(corpus, work / f"filter{i}", args.per_class))[0])
    manifest = json.loads((work / "filter0" / "manifest.json").read_text())
    plain_written = sum(1 for p in (work / "plain0").glob("*.tar") for _ in _keys(p))
    ratio = statistics.median(p / f for p, f in zip(plain_s, filter_s, strict=True))
    shutil.rmtree(corpus)

    rows = []
    for scale in (1, 4):
        root = work / f"x{scale}"
        records = scale * args.memory_records
        write_labeled_corpus(root, records, 1000)
        per_class = max(1, records // 11 // 1000)  # ten drops for each record kept
        seconds, peak = timed(_filter(root, root / "train", per_class))
        rows.append(
            (records, seconds, peak, json.loads((root / "train" / "manifest.json").read_text()))
        )
        shutil.rmtree(root)
    shutil.rmtree(work)
    (r1, s1, m1, f1), (r4, s4, m4, f4) = rows
    append(
        f"pipeline filter vs plain loop ({args.records:,} pseudo-labels of 160-px JPEGs, "
        f"{args.classes} long-tailed classes) and memory at 1x / 4x",
        f"python bench/bench_filter.py --records {args.records} --classes {args.classes} "
        f"--repeats {args.repeats} --memory-records {args.memory_records}",
        [
            "| measure | value |",
            "|---|---|",
            f"| plain loop wall s (runs) | {', '.join(f'{s:.1f}' for s in plain_s)} |",
            f"| pipeline filter wall s (runs) | {', '.join(f'{s:.1f}' for s in filter_s)} |",
            f"| **plain / filter, median of alternated runs** | **{ratio:.2f}** (target >= 1.0) |",
            f"| training samples written (filter / plain) | {manifest['samples_written']:,} / {plain_written:,} |",
            f"| filter records/s (median run) | {args.records / statistics.median(filter_s):,.0f} |",
            f"| filter at {r1:,} records (drops 10x keeps) | {s1:.1f} s, {m1 / 1024:.0f} MiB peak, {f1['samples_written']:,} written |",
            f"| filter at {r4:,} records | {s4:.1f} s, {m4 / 1024:.0f} MiB peak ({m4 / m1 - 1:+.1%}), {f4['samples_written']:,} written |",
        ],
        "filter",
        {
            "ratio_plain_over_filter": ratio,
            "records": [r1, r4],
            "records_per_s": [r1 / s1, r4 / s4],
            "peak_rss_mib": [m1 / 1024, m4 / 1024],
        },
    )


def _keys(path: Path) -> set[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers()}


if __name__ == "__main__":
    main()

"""`pipeline filter` throughput and memory as the corpus grows.

    python bench/bench_filter.py [--records 100000] [--classes 1000]

Writes synthetic source shards (small real PNGs) with aligned pseudo-label sidecars
(Dirichlet soft labels over `--classes`, the label stage's exact record format), then
times `pipeline filter` as a whole process at 1x and 4x the records and compares peak
memory.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import photo_jpeg  # noqa: E402
from bench.record import append, timed  # noqa: E402
from data.records import PseudoLabel, content_hash, pseudo_sample, shard_header  # noqa: E402
from data.storage import write_json  # noqa: E402
from data.write import write_shard  # noqa: E402


def write_labeled_corpus(
    root: Path,
    records: int,
    classes: int,
    shard_size: int = 1000,
    seed: int = 0,
    photos: bool = False,
) -> None:
    """Source shards and their sidecars, as `pipeline label` would leave them. The images are
    small distinct PNGs, or with `photos` 224-px photo-like JPEGs (real sizes, slower)."""
    rng = np.random.default_rng(seed)
    palette = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        palette.append(buf.getvalue())
    for shard in range(0, records, shard_size):
        name = f"part-{shard // shard_size:06d}.tar"
        n = min(shard_size, records - shard)
        keys = [f"img{shard + i:08d}" for i in range(n)]
        # Distinct bytes each: a valid PNG followed by the key, or a fresh photo.
        images = [
            photo_jpeg(rng) if photos else palette[i % 64] + keys[i].encode() for i in range(n)
        ]
        ext = "jpg" if photos else "png"
        write_shard(
            str(root / "src" / name),
            [{"__key__": k, ext: b} for k, b in zip(keys, images, strict=True)],
        )
        top = rng.integers(0, classes, n)
        conf = rng.beta(5, 2, n)
        samples = [
            shard_header(teacher="bench@0", source=str(root / "src" / name), topk=16, embed=False)
        ]
        for i, key in enumerate(keys):
            others = rng.choice(classes, 15, replace=False)
            rest = rng.dirichlet(np.ones(15)) * (1 - conf[i])
            indices = np.concatenate([[top[i]], others])
            probs = np.concatenate([[conf[i]], np.sort(rest)[::-1]]).astype(np.float16)
            samples.append(
                pseudo_sample(
                    PseudoLabel(key, indices, probs, float(conf[i]), 2.0, content_hash(images[i]))
                )
            )
        write_shard(str(root / "labels" / name), samples)
    write_json(
        str(root / "labels" / "manifest.json"), {"stage": "label", "args": {"teacher": "bench"}}
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    rows = []
    for scale in (1, 4):
        root = work / f"x{scale}"
        write_labeled_corpus(root, scale * args.records, args.classes)
        per_class = int(0.6 * scale * args.records / args.classes)
        cmd = [
            sys.executable,
            "-m",
            "pipeline",
            "filter",
            "--input",
            str(root / "labels"),
            "--output",
            str(root / "train"),
            "--per-class",
            str(per_class),
        ]
        seconds, peak = timed(cmd)
        manifest = json.loads((root / "train" / "manifest.json").read_text())
        rows.append((scale, seconds, peak, manifest))
        shutil.rmtree(root)
    shutil.rmtree(work)
    (_, s1, m1, f1), (_, s4, m4, f4) = rows
    append(
        f"pipeline filter throughput and memory ({args.records:,} and {4 * args.records:,} records, {args.classes} classes)",
        f"python bench/bench_filter.py --records {args.records} --classes {args.classes}",
        [
            "| records | wall s | records/s | training samples written | peak RSS |",
            "|---|---|---|---|---|",
            f"| {f1['samples_in']:,} | {s1:.1f} | {f1['samples_in'] / s1:,.0f} | {f1['samples_written']:,} | {m1 / 1024:.0f} MiB |",
            f"| {f4['samples_in']:,} | {s4:.1f} | {f4['samples_in'] / s4:,.0f} | {f4['samples_written']:,} | {m4 / 1024:.0f} MiB ({m4 / m1 - 1:+.1%}) |",
        ],
        "filter",
        {
            "records": [f1["samples_in"], f4["samples_in"]],
            "records_per_s": [f1["samples_in"] / s1, f4["samples_in"] / s4],
            "peak_rss_mib": [m1 / 1024, m4 / 1024],
        },
    )


if __name__ == "__main__":
    main()

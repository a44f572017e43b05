"""`pipeline stats` throughput and memory, and the bytes one record costs at each stage.

    python bench/bench_stats.py [--images 2000] [--classes 100]

Writes 224-px photo-like JPEG shards with aligned top-16 pseudo-label sidecars (the label
stage's record format), filters them into training shards, and runs `pipeline stats` as a
whole process on each: samples/s and peak memory at 1x and 4x the images, and bytes per
record on disk (tar headers and padding included) for raw, pseudo-label and training shards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_filter import write_labeled_corpus  # noqa: E402
from bench.record import append, timed  # noqa: E402

STAGES = ("src", "labels", "train")


def stats(folder: Path) -> tuple[float, int, dict]:
    """Wall seconds, peak RSS (KiB) and the JSON report of `pipeline stats FOLDER`."""
    out = folder.with_suffix(".stats.json")
    seconds, peak = timed(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", "stats", str(folder), "--json", str(out)]
    )
    return seconds, peak, json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-stats-"))
    runs: dict[int, dict[str, tuple[float, int, dict]]] = {}
    for scale in (1, 4):
        root = work / f"x{scale}"
        images = scale * args.images
        write_labeled_corpus(root, images, args.classes, shard_size=200, photo_size=224)
        filter_cmd = ["filter", "--input", str(root / "labels"), "--output", str(root / "train")]
        per_class = str(images // args.classes)
        timed(
            [sys.executable, "-m", "rs_pseudolabel.pipeline", *filter_cmd, "--per-class", per_class]
        )
        runs[scale] = {stage: stats(root / stage) for stage in STAGES}
        shutil.rmtree(root)
    shutil.rmtree(work)

    rows = [
        "| shards | samples 1x / 4x | bytes/record | stats s 1x / 4x | samples/s at 4x | peak RSS 1x | peak RSS 4x |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"src": "raw (224-px JPEG)", "labels": "pseudo-label sidecar", "train": "training"}
    for stage in STAGES:
        s1, m1, r1 = runs[1][stage]
        s4, m4, r4 = runs[4][stage]
        rows.append(
            f"| {names[stage]} | {r1['samples']:,} / {r4['samples']:,} | "
            f"{r4['bytes_per_sample']:,.0f} | {s1:.1f} / {s4:.1f} | {r4['samples'] / s4:,.0f} | "
            f"{m1 / 1024:.0f} MiB | {m4 / 1024:.0f} MiB ({m4 / m1 - 1:+.1%}) |"
        )
    append(
        f"pipeline stats throughput, memory and bytes per record ({args.images:,} and {4 * args.images:,} images)",
        f"python bench/bench_stats.py --images {args.images} --classes {args.classes}",
        rows,
        "stats",
        {
            stage: {
                "bytes_per_record": runs[4][stage][2]["bytes_per_sample"],
                "samples_per_s": runs[4][stage][2]["samples"] / runs[4][stage][0],
                "peak_rss_mib": [runs[1][stage][1] / 1024, runs[4][stage][1] / 1024],
            }
            for stage in STAGES
        },
    )


if __name__ == "__main__":
    main()

"""The cost of a 130M-image run, projected from the figures the other benchmarks measured.

    python bench/cost.py [--images 130000000] [--teacher rs-152]

Reads bench/results/{label,filter,stats,train,scale}.json (written by bench_label.py,
bench_filter.py, bench_stats.py, bench_train.py and bench_scale.py on this machine) and appends a table in
which every number is a measurement times a stated assumption.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.record import ROOT, append  # noqa: E402
from rs_pseudolabel.students.config import resolve_recipe  # noqa: E402
from rs_pseudolabel.teachers.table import models_table  # noqa: E402

IMAGENET = 1_281_167  # labeled training images per epoch


def _results(name: str) -> dict:
    path = ROOT / "bench" / "results" / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bench/bench_{name}.py first")
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=130_000_000)
    parser.add_argument("--teacher", default="rs-152")
    args = parser.parse_args()
    label, filt, stats, train, scale = (
        _results(n) for n in ("label", "filter", "stats", "train", "scale")
    )
    cores = int(label["machine"].split()[0])
    gflops = {row["name"]: row["gflops"] for row in models_table([label["model"], args.teacher])}
    recipe = resolve_recipe("imagenet", model=train["model"])
    student_images = IMAGENET * recipe.epochs * (1 + recipe.unlabeled_ratio)
    n = args.images

    def core_hours(images: float, per_s: float) -> str:
        return f"{images / per_s * cores / 3600:,.0f}"

    def gib(count: float, bytes_each: float) -> str:
        return f"{count * bytes_each / 2**30:,.0f} GiB"

    label_per_s = label["images_per_s"] * gflops[label["model"]] / gflops[args.teacher]
    rows = [
        "| stage | projected CPU core-hours | GPU-hours | storage written | from |",
        "|---|---|---|---|---|",
        f"| label ({args.teacher}) | {core_hours(n, label_per_s)} | not measured | "
        f"{gib(n, label['sidecar_bytes_per_record'])} sidecars | "
        f"{label['images_per_s']:.1f} img/s of {label['model']} (bench_label) x "
        f"{gflops[label['model']]} / {gflops[args.teacher]} GFLOPs |",
        f"| filter | {core_hours(n, filt['records_per_s'][-1])} | - | "
        f"{gib(n, stats['train']['bytes_per_record'])} training shards | "
        f"{filt['records_per_s'][-1]:,.0f} records/s (bench_filter, 4x run) |",
        f"| stats (raw shards) | {core_hours(n, stats['src']['samples_per_s'])} | - | - | "
        f"{stats['src']['samples_per_s']:,.0f} samples/s (bench_stats) |",
        f"| train student ({train['model']} at {train['train_size']} px) | "
        f"{core_hours(student_images, train['images_per_s'])} | not measured | "
        f"checkpoints only | {train['images_per_s']:.2f} img/s (bench_train) over "
        f"{student_images / 1e9:.2f} B images |",
        f"| raw corpus (input) | - | - | {gib(n, stats['src']['bytes_per_record'])} | "
        f"{stats['src']['bytes_per_record']:,.0f} B per 224-px JPEG (bench_stats) |",
        f"| launcher of label or filter ({n // 1000:,} shards of 1,000) | "
        f"{scale['projected_launcher_merge_hours']:.2f} wall-hours | - | manifests, reports | "
        "listings of a page per 1,000 names, one read per shard report 8 at a time, 30 ms a "
        f"request; a finished rerun: {scale['gcs_rerun_requests']} requests (bench_scale) |",
    ]
    notes = [
        "",
        f"Assumptions: {n:,} unlabeled images; CPU time scales with GFLOPs between teachers "
        f"(the paper's FLOPs at eval size, `pipeline models`); core-hours = wall hours on "
        f"this {cores}-core machine x {cores}. The student sees {recipe.epochs} epochs of "
        f"{IMAGENET:,} labeled images, each step with {recipe.unlabeled_ratio}x as many "
        f"pseudo-labeled ones (`--config imagenet`). Storage: sidecars without "
        "`--embed` (an embedding adds 512 B of payload per record); training shards hold "
        f"{n:,} samples (1,000 classes x 130,000), images at the benchmark's JPEG size; real "
        "web images are larger, so scale the raw and training rows by your mean file size. "
        "GPU-hours: no GPU was lent to the machine these figures come from; "
        "`bench/bench_label.py` run on a GPU machine gives the label rate to put here. The "
        "stats rate includes the command's start-up (about 5 s at the benchmark's 8,000 "
        "samples), so its row is an upper bound.",
    ]
    append(
        f"Projected cost of {n / 1e6:.0f}M images",
        f"python bench/cost.py --images {n} --teacher {args.teacher}",
        rows + notes,
        "cost",
        {"images": n, "teacher": args.teacher, "student_images": student_images},
    )


if __name__ == "__main__":
    main()

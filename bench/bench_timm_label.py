"""`pipeline label` with a timm teacher against a plain loop written with timm's API alone,
whole processes alternated on the same shards.

    python bench/bench_timm_label.py [--model convnext_atto] [--images 768] [--repeats 3]

The teacher has seeded random weights (nothing is downloaded), 1,000 classes, and labels
JPEGs of 224 px at timm's own eval transform for the name, batch 32, on the CPU. Each
repeat runs both, one after the other; its ratio is plain time / label time. Target: the
mean ratio >= 1.0, met only when the low end of its 95% interval (Student's t over the
repeats) is at or above 1.0.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_demo import interval  # noqa: E402
from bench.corpus import write_corpus  # noqa: E402
from bench.record import append, timed  # noqa: E402

BATCH = 32


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="convnext_atto")
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-timm-label-"))
    torch.manual_seed(0)
    weights = work / "teacher.safetensors"
    save_file(timm.create_model(args.model, pretrained=False).state_dict(), str(weights))
    corpus = work / "corpus"
    write_corpus(str(corpus), args.images)
    plain = [
        sys.executable, str(Path(__file__).parent / "label_plain_timm.py"), "--model",
        args.model, "--weights", str(weights), "--input", str(corpus), "--batch-size",
        str(BATCH),
    ]  # fmt: skip

    def label(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "rs_pseudolabel.pipeline", "label", "--teacher", f"timm:{args.model}",
            "--weights", str(weights), "--input", str(corpus), "--output", str(out),
            "--batch-size", str(BATCH), "--device", "cpu",
        ]  # fmt: skip

    timed(plain)  # the file cache and imports, once
    plain_s, label_s = [], []
    for i in range(args.repeats):
        plain_s.append(timed(plain)[0])
        label_s.append(timed(label(work / f"out{i}"))[0])
    shutil.rmtree(work)
    ratios = [p / q for p, q in zip(plain_s, label_s, strict=True)]
    mean, low, high = interval(ratios)
    rows = [
        "| measure | value |",
        "|---|---|",
        f"| teacher, images, batch | timm:{args.model} (random weights, 1,000 classes), "
        f"{args.images:,} JPEGs of 224 px, {BATCH} |",
        f"| plain timm loop, s | {', '.join(f'{s:.1f}' for s in plain_s)} |",
        f"| pipeline label, s | {', '.join(f'{s:.1f}' for s in label_s)} |",
        f"| plain / label, each repeat | {', '.join(f'{r:.2f}' for r in ratios)} |",
        f"| plain / label, mean of {args.repeats} (95% CI) | **{mean:.2f}** ({low:.2f} to "
        f"{high:.2f}); target >= 1.0: {'met' if low >= 1.0 else 'not established'} |",
    ]
    append(
        f"pipeline label with a timm teacher against a plain timm loop ({args.model})",
        f"python bench/bench_timm_label.py --model {args.model} --images {args.images} "
        f"--repeats {args.repeats}",
        rows,
        "timm_label",
        {
            "model": args.model,
            "plain_s": plain_s,
            "label_s": label_s,
            "ratios": ratios,
            "ratio": mean,
            "ratio_ci": [low, high],
        },
    )


if __name__ == "__main__":
    main()

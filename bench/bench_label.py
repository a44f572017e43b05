"""`pipeline label` against a plain single-process loop doing the same work, whole processes.

    python bench/bench_label.py [--images 768] [--repeats 3]

Alternates plain and Beam runs on the same shards and reports the median ratio
plain time / label time, the share of label time in the teacher's forward pass, bytes per
pseudo-label record, and peak memory at 1x and 4x the corpus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import write_corpus  # noqa: E402
from bench.record import append, timed  # noqa: E402
from teachers import create_model, export_run, get_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="rs-50")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-label-"))
    torch.manual_seed(0)
    teacher = work / "teacher"
    export_run(str(teacher), create_model(args.model, num_classes=1000).eval(), args.model, None)
    corpus = work / "corpus"
    write_corpus(str(corpus), args.images)
    plain = [
        sys.executable,
        str(Path(__file__).parent / "label_plain.py"),
        "--teacher",
        str(teacher),
        "--input",
        str(corpus),
        "--batch-size",
        str(args.batch_size),
    ]

    def label(src: Path, out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pipeline",
            "label",
            "--teacher",
            str(teacher),
            "--input",
            str(src),
            "--output",
            str(out),
            "--batch-size",
            str(args.batch_size),
        ]

    timed(plain)  # warm the file cache and the imports once
    plain_s, label_s, forward_share = [], [], []
    for i in range(args.repeats):
        plain_s.append(timed(plain)[0])
        out = work / f"out{i}"
        label_s.append(timed(label(corpus, out))[0])
        manifest = json.loads((out / "manifest.json").read_text())
        reports = [json.loads(p.read_text()) for p in (out / "_reports").glob("*.json")]
        forward_share.append(
            sum(r["forward_seconds"] for r in reports) / sum(r["seconds"] for r in reports)
        )
        records = manifest["samples_out"]
    ratio = statistics.median(p / q for p, q in zip(plain_s, label_s, strict=True))
    sidecars = sorted(out.glob("*.tar"))
    payload = sum(len(m) for m in _payloads(sidecars)) / records
    on_disk = sum(p.stat().st_size for p in sidecars) / records

    big = work / "corpus4x"
    write_corpus(str(big), 4 * args.images, seed=1)
    _, mem_1x = timed(label(corpus, work / "mem1x"))
    _, mem_4x = timed(label(big, work / "mem4x"))
    shutil.rmtree(work)

    append(
        f"pipeline label vs plain loop ({args.model}, {args.images} JPEGs of 224 px)",
        f"python bench/bench_label.py --images {args.images} --repeats {args.repeats}",
        [
            "| measure | value |",
            "|---|---|",
            f"| plain loop wall s (runs) | {', '.join(f'{s:.1f}' for s in plain_s)} |",
            f"| pipeline label wall s (runs) | {', '.join(f'{s:.1f}' for s in label_s)} |",
            f"| **plain / label, median of alternated runs** | **{ratio:.3f}** (target >= 0.95) |",
            f"| share of label worker time in the forward pass | {statistics.median(forward_share):.1%} |",
            f"| images/s (label, median run) | {args.images / statistics.median(label_s):.1f} |",
            f"| pseudo-label payload, bytes/record (top-16) | {payload:.1f} |",
            f"| sidecar shard bytes on disk per record | {on_disk:.1f} |",
            f"| peak RSS label, {args.images} images | {mem_1x / 1024:.0f} MiB |",
            f"| peak RSS label, {4 * args.images} images | {mem_4x / 1024:.0f} MiB ({mem_4x / mem_1x - 1:+.1%}) |",
        ],
        "label",
        {
            "model": args.model,
            "train_size": get_config(args.model).train_size,
            "ratio_plain_over_label": ratio,
            "images_per_s": args.images / statistics.median(label_s),
            "payload_bytes_per_record": payload,
            "sidecar_bytes_per_record": on_disk,
            "peak_rss_mib": [mem_1x / 1024, mem_4x / 1024],
        },
    )


def _payloads(shards: list[Path]) -> list[bytes]:
    import tarfile

    found = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            found += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".pl")]
    return found


if __name__ == "__main__":
    main()

"""`pipeline label` against a plain single-process loop doing the same work, whole processes.

    python bench/bench_label.py [--repeats 3] [--before REV]

Two cases, each alternating plain and Beam runs on the same shards, median of plain time /
label time:
- decode-bound: rs-mini (a cheap model, as a teacher on a GPU is) over 8,192 JPEGs of
  224 px, batch 64; target >= 1.3 (at 2,048 images both processes' start-up outweighs the
  work: see the bound row);
- compute-bound: rs-50 at 160 px over 768 JPEGs of 224 px, batch 32; target >= 1.0.
Also: launch to first batch (the first forward pass) of both, label's exit after its last
forward pass, the share of worker time in the forward pass, bytes per pseudo-label record,
and peak memory at 1x and 4x the corpus.

The bound row is the whole-process ratio a label process would reach with the plain loop's
own start-up and exit (imports, model load) and its work spread over every core with no
cost at all: plain_s / (plain start-up + plain work / cores). Where it is below the target,
no input path can meet the target at this corpus size; the steady state is then what says
whether the cores are used.

With `--before REV`, each decode-bound repeat also runs REV's `pipeline label` (from a git
worktree) on the same shards, between the two: the ratio of the two labels, measured in the
same minutes, says whether a change moved the stage, whatever the machine's speed that day.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import write_corpus  # noqa: E402
from bench.record import ROOT, append, timed  # noqa: E402
from rs_pseudolabel.teachers import create_model, export_run, get_config  # noqa: E402

CASES = {  # name: (model, images, batch size, target plain / label)
    "decode-bound": ("rs-mini", 8192, 64, 1.3),
    "compute-bound": ("rs-50", 768, 32, 1.0),
}


def _label(teacher: Path, src: Path, out: Path, batch: int, checkout: Path = ROOT) -> list[str]:
    """The label command of the code in `checkout` (run with it as the working directory);
    a revision before the one-namespace layout (--before) names its modules bare."""
    module = "rs_pseudolabel.pipeline" if (checkout / "rs_pseudolabel").is_dir() else "pipeline"
    return [
        sys.executable, "-m", module, "label", "--teacher", str(teacher),
        "--input", str(src), "--output", str(out), "--batch-size", str(batch),
    ]  # fmt: skip


def _plain(teacher: Path, src: Path, batch: int, timing: Path | None = None) -> list[str]:
    return [
        sys.executable, str(Path(__file__).parent / "label_plain.py"), "--teacher",
        str(teacher), "--input", str(src), "--batch-size", str(batch),
        *(["--timing", str(timing)] if timing else []),
    ]  # fmt: skip


def _reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "_reports").glob("*.json")]


def run_case(work: Path, name: str, repeats: int, old: Path | None = None) -> dict:
    """`old`: a checkout of an earlier revision, whose label runs too (see --before)."""
    model, images, batch, _ = CASES[name]
    torch.manual_seed(0)
    teacher = work / f"teacher-{model}"
    export_run(str(teacher), create_model(model, num_classes=1000).eval(), model, None)
    corpus = work / f"corpus-{name}"
    write_corpus(str(corpus), images)
    timed(_plain(teacher, corpus, batch))  # the file cache and imports, once
    plain_s, label_s, forward_share, first_batch, steady = [], [], [], [], []
    plain_first, label_tail, bound, before_s = [], [], [], []
    cores = len(os.sched_getaffinity(0))
    timing = work / "plain-timing.json"
    for i in range(repeats):
        launched = time.time()
        plain_s.append(timed(_plain(teacher, corpus, batch, timing))[0])
        window = json.loads(timing.read_text())
        (first, before), (last, after) = window["first_forward"], window["last_forward"]
        plain_rate = (after - before) / (last - first)
        # Start-up: launch to the end of the first forward pass, less that batch's own work.
        startup = first - launched - before / plain_rate
        plain_first.append(first - launched)
        bound.append(plain_s[-1] / (startup + (plain_s[-1] - startup) / cores))
        if old is not None:
            old_out = work / f"{name}-before{i}"
            before_s.append(timed(_label(teacher, corpus, old_out, batch, old), cwd=old)[0])
            shutil.rmtree(old_out)
        out = work / f"{name}-out{i}"
        launched = time.time()
        label_s.append(timed(_label(teacher, corpus, out, batch))[0])
        reports = _reports(out)
        forward_share.append(
            sum(r["forward_seconds"] for r in reports) / sum(r["seconds"] for r in reports)
        )
        first = min(r["first_forward_at"] for r in reports)
        first_batch.append(first - launched)
        last = max(r["last_forward_at"] for r in reports)
        label_tail.append(launched + label_s[-1] - last)
        # Steady state: images per second from the end of the first forward pass to the end
        # of the last, both sides (the first batch's images are before the window).
        steady.append((images - batch) / (last - first) / plain_rate)
    return {
        "model": model,
        "images": images,
        "batch": batch,
        "plain_s": plain_s,
        "label_s": label_s,
        "ratio": statistics.median(p / q for p, q in zip(plain_s, label_s, strict=True)),
        "before_s": before_s,
        "before_over_now": (
            statistics.median(p / q for p, q in zip(before_s, label_s, strict=True))
            if before_s
            else None
        ),
        "forward_share": statistics.median(forward_share),
        "first_batch_s": statistics.median(first_batch),
        "plain_first_batch_s": statistics.median(plain_first),
        "label_tail_s": statistics.median(label_tail),
        "bound": statistics.median(bound),
        "steady_ratio": statistics.median(steady),
        "out": out,
        "teacher": teacher,
        "corpus": corpus,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", help="also time this revision's label (decode-bound)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-label-"))
    old = None
    if args.before:
        old = work / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", str(old), args.before])
    try:
        results = {
            name: run_case(work, name, args.repeats, old if name == "decode-bound" else None)
            for name in CASES
        }
    finally:
        if old is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])

    compute = results["compute-bound"]
    sidecars = sorted(compute["out"].glob("*.tar"))
    records = json.loads((compute["out"] / "manifest.json").read_text())["samples_out"]
    payload = sum(len(m) for m in _payloads(sidecars)) / records
    on_disk = sum(p.stat().st_size for p in sidecars) / records
    big = work / "corpus4x"
    write_corpus(str(big), 4 * compute["images"], seed=1)
    _, mem_1x = timed(_label(compute["teacher"], compute["corpus"], work / "mem1x", 32))
    _, mem_4x = timed(_label(compute["teacher"], big, work / "mem4x", 32))
    shutil.rmtree(work)

    rows = ["| measure | decode-bound | compute-bound |", "|---|---|---|"]

    def row(label: str, fmt) -> None:
        rows.append(f"| {label} | {fmt(results['decode-bound'])} | {fmt(compute)} |")

    row(
        "model, images, batch",
        lambda r: f"{r['model']}, {r['images']:,} JPEGs of 224 px, {r['batch']}",
    )
    row("plain loop wall s (runs)", lambda r: ", ".join(f"{s:.1f}" for s in r["plain_s"]))
    row("pipeline label wall s (runs)", lambda r: ", ".join(f"{s:.1f}" for s in r["label_s"]))
    decode = results["decode-bound"]
    if decode["before_s"]:
        runs = ", ".join(f"{s:.1f}" for s in decode["before_s"])
        rows.append(f"| label at {args.before}, wall s (runs) | {runs} | |")
        rows.append(
            f"| **label at {args.before} / label now, median** | "
            f"**{decode['before_over_now']:.2f}** | |"
        )
    row(
        "**plain / label, median of alternated runs**",
        lambda r: f"**{r['ratio']:.2f}**",
    )
    rows.append(f"| target | >= {CASES['decode-bound'][3]} | >= {CASES['compute-bound'][3]} |")
    row(
        "images/s (label, median run)",
        lambda r: f"{r['images'] / statistics.median(r['label_s']):.0f}",
    )
    row(
        "steady state (first to last forward pass): label / plain images/s, median",
        lambda r: f"{r['steady_ratio']:.2f}",
    )
    row(
        "bound: plain / (plain start-up and exit + plain work / cores), median",
        lambda r: f"{r['bound']:.2f}",
    )
    row(
        "launch to first batch, s: label (plain)",
        lambda r: f"{r['first_batch_s']:.1f} ({r['plain_first_batch_s']:.1f})",
    )
    row("label: last forward pass to exit, s", lambda r: f"{r['label_tail_s']:.2f}")
    row("share of worker time in the forward pass", lambda r: f"{r['forward_share']:.0%}")
    rows += [
        "",
        f"Pseudo-label payload {payload:.1f} bytes/record (top-16); sidecar {on_disk:.1f} bytes "
        f"per record on disk. Peak RSS of label (rs-50): {mem_1x / 1024:.0f} MiB at "
        f"{compute['images']:,} images, {mem_4x / 1024:.0f} MiB at {4 * compute['images']:,} "
        f"({mem_4x / mem_1x - 1:+.1%}).",
    ]
    append(
        "pipeline label vs plain loop: decode-bound and compute-bound",
        f"python bench/bench_label.py --repeats {args.repeats}"
        + (f" --before {args.before}" if args.before else ""),
        rows,
        "label",
        {
            "model": compute["model"],
            "train_size": get_config(compute["model"]).train_size,
            "ratio_plain_over_label": compute["ratio"],
            "ratio_decode_bound": results["decode-bound"]["ratio"],
            "images_per_s": compute["images"] / statistics.median(compute["label_s"]),
            "first_batch_s": results["decode-bound"]["first_batch_s"],
            "steady_ratio_decode_bound": results["decode-bound"]["steady_ratio"],
            "bound_decode_bound": results["decode-bound"]["bound"],
            "before_over_now_decode_bound": decode["before_over_now"],
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

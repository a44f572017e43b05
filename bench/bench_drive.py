"""The label stage's driving thread: its CPU time per image outside the forward pass.

    python bench/bench_drive.py [--before REV] [--images 2048] [--repeats 3]

The thread that drives the device should do nothing per image: on a GPU every microsecond
it spends per image caps the stage at 1e6 / us images per second whatever the card. Here
(on CPU, with rs-mini, where the forward is cheap and one torch thread runs it on the
driving thread itself) `label_shard` labels a corpus of 224 px JPEGs in this process;
the driving thread's CPU time (`time.thread_time`) is taken over the whole run, less the
CPU time spent inside the model's `forward_features`, `forward_head` and classifier. What remains is
its own work: on the old code reading, hashing, normalising, summarising and writing; now
queue hand-offs, normalising, top-k and entropy on the device (on a GPU these are kernel
launches). With `--before REV`, the same measurement runs on REV's code in a worktree in
the same run, as the baseline. Goal: <= 30 us per image.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(images: int, repeats: int, work: Path) -> dict:
    """Median us per image of the driving thread outside the forward, and inside it."""
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.corpus import write_corpus

    # A revision before the one-namespace layout (--before) names its modules bare.
    prefix = "rs_pseudolabel." if (ROOT / "rs_pseudolabel").is_dir() else ""
    default_processes = importlib.import_module(f"{prefix}pipeline.label_decode").default_processes
    shard = importlib.import_module(f"{prefix}pipeline.label_shard")
    Teacher, label_shard = shard.Teacher, shard.label_shard
    teachers = importlib.import_module(f"{prefix}teachers")
    create_model, export_run = teachers.create_model, teachers.export_run

    torch.set_num_threads(1)
    torch.manual_seed(0)
    run = work / "teacher"
    export_run(str(run), create_model("rs-mini", num_classes=1000).eval(), "rs-mini", None)
    urls = write_corpus(str(work / "corpus"), images, shard_size=512)
    teacher = Teacher.load(str(run), None, "cpu", decode="cpu", processes=default_processes())
    model, inside = teacher.predictor.model, [0.0]

    def timed(method):
        def wrapper(*args, **kwargs):
            tick = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                inside[0] += time.thread_time() - tick

        return wrapper

    model.forward_features = timed(model.forward_features)
    model.forward_head = timed(model.forward_head)
    classifier = model.get_classifier()
    classifier.forward = timed(classifier.forward)
    outside, forward = [], []
    label_shard(urls[0], "warm.tar", str(work / "warm"), teacher, 64, 16, False)
    for i in range(repeats):
        inside[0], labeled = 0.0, 0
        tick = time.thread_time()
        for j, url in enumerate(urls):
            out = str(work / f"out{i}")
            labeled += label_shard(url, f"s{j}.tar", out, teacher, 64, 16, False).samples_out
        total = time.thread_time() - tick
        outside.append((total - inside[0]) / labeled * 1e6)
        forward.append(inside[0] / labeled * 1e6)
    return {
        "images": labeled,
        "outside_us_per_image": statistics.median(outside),
        "outside_runs": [round(v, 1) for v in outside],
        "forward_us_per_image": statistics.median(forward),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", help="also measure this revision's code, as the baseline")
    parser.add_argument("--only", action="store_true", help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-drive-"))
    if args.only:
        print(json.dumps(measure(args.images, args.repeats, work)))
        return
    figures = {"now": _child(ROOT, args, work / "now")}
    if args.before:
        old = work / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", str(old), args.before])
        try:
            shutil.copy(__file__, old / "bench" / "bench_drive.py")
            figures["before"] = _child(old, args, work / "before")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])
    shutil.rmtree(work, ignore_errors=True)

    sys.path.insert(0, str(ROOT))
    from bench.record import append

    rows = ["| code | driving thread us/image outside the forward (runs) | forward us/image |"]
    rows.append("|---|---|---|")
    for name, f in figures.items():
        label = f"before ({args.before})" if name == "before" else "now"
        runs = ", ".join(str(v) for v in f["outside_runs"])
        rows.append(
            f"| {label} | **{f['outside_us_per_image']:.1f}** ({runs}) | "
            f"{f['forward_us_per_image']:.1f} |"
        )
    rows += [
        "",
        f"Goal: <= 30 us per image. {figures['now']['images']:,} JPEGs of 224 px, rs-mini.",
    ]
    append(
        "label: the driving thread's time per image outside the forward pass",
        "python bench/bench_drive.py" + (f" --before {args.before}" if args.before else ""),
        rows,
        "drive",
        figures,
    )


def _child(root: Path, args: argparse.Namespace, work: Path) -> dict:
    """One measurement in a process of its own, on the code under `root`."""
    cmd = [sys.executable, str(root / "bench" / "bench_drive.py"), "--only"]
    cmd += ["--images", str(args.images), "--repeats", str(args.repeats)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

"""What the launcher costs as the shard count grows: real files, simulated scale.

    python bench/bench_scale.py [--shards 20000 80000] [--gcs-shards 1000]

(a) Corpora of tiny shards (10 small PNGs each), local disk: the launcher's peak RSS and wall
    time for a fresh `pipeline label`, a rerun of the finished job, and the same for
    `pipeline filter`. Beam's workers run in their own processes
    (`--direct_running_mode=multi_processing`), so the launcher's own peak (VmHWM) is read,
    and its peak anonymous memory (RssAnon, sampled): VmHWM also counts the pages of torch's
    shared libraries, whose residency varies from run to run (722 to 833 MiB over five
    identical reruns of a 20-shard label job, RssAnon 371 to 372 MiB).
(b) On gs:// (fake-gcs-server on loopback, every request in its log): requests per shard for
    a first label run, and all requests of a finished rerun.
(c) The filter's objects written per output shard, on the same bucket.
Then the launcher's time at 130,000 shards and 30 ms per request.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.update(
    NO_GCE_CHECK="True",
    GCE_METADATA_HOST="127.0.0.1:9",
    FSSPEC_GS_TOKEN="anon",
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
)

from bench.fixtures import (
    SPEC_KEYS,  # noqa: E402
    write_shard,  # noqa: E402
)
from bench.record import append  # noqa: E402
from rs_pseudolabel.data.storage import walk_files, write_bytes  # noqa: E402
from rs_pseudolabel.teachers import create_model, export_run  # noqa: E402
from tests.conftest import image_bytes  # noqa: E402
from tests.servers import start_gcs  # noqa: E402

RECORDS = 10
PROJECTED_SHARDS = 130_000
REQUEST_SECONDS = 0.03


def write_tiny_corpus(root: Path, shards: int) -> None:
    images = [image_bytes(size=(8 + i, 8)) for i in range(RECORDS)]
    for k in range(shards):
        write_shard(
            str(root / f"part-{k:06d}.tar"),
            [{"__key__": f"s{k:06d}i{i}", "png": images[i]} for i in range(RECORDS)],
        )


def launcher(args: list[str]) -> tuple[float, int, int]:
    """Wall seconds, the launcher process's own peak RSS and peak anonymous RSS (KiB),
    workers excluded."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = anon = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
            anon = max(anon, int(status.split("RssAnon:")[1].split()[0]))
        except (FileNotFoundError, IndexError, ProcessLookupError):
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline {' '.join(args)} failed: {proc.stderr.read()[-3000:]}")
    return seconds, peak, anon


WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def local_scale(work: Path, teacher: Path, shards: int, with_stats: bool) -> dict:
    src, labels, train = work / f"src{shards}", work / f"labels{shards}", work / f"train{shards}"
    write_tiny_corpus(src, shards)
    label = ["label", "--teacher", str(teacher), "--input", str(src), "--output", str(labels)]
    label += ["--decode-processes", "0", *WORKERS]
    filt = ["filter", "--input", str(labels), "--output", str(train), "--threshold", "0"]
    filt += ["--per-class", str(shards), *WORKERS]
    figures = {
        "label_fresh": launcher(label),
        "label_rerun": launcher(label),
        "filter_fresh": launcher(filt),
        "filter_rerun": launcher(filt),
    }
    if with_stats:
        figures["stats"] = stats_both_ways(work, labels)
    shutil.rmtree(src), shutil.rmtree(labels), shutil.rmtree(train)
    return figures


def stats_both_ways(work: Path, labels: Path) -> dict:
    """`pipeline stats` from the label manifest, then a full scan with 2 DirectRunner workers."""
    answers, seconds = [], []
    for extra in ([], ["--scan", *WORKERS]):
        out = work / "stats.json"
        seconds.append(launcher(["stats", str(labels), "--json", str(out), *extra])[0])
        answers.append(json.loads(out.read_text()))
    recorded, scanned = answers
    same = all(recorded[key] == scanned[key] for key in SPEC_KEYS)
    return {"seconds": seconds, "sources": [a["source"] for a in answers], "same": same}


def gcs_scale(work: Path, teacher: Path, shards: int) -> dict:
    server = start_gcs(work)
    try:
        bucket = server.make_bucket("scale")
        src = work / "gcs-src"
        write_tiny_corpus(src, shards)
        for path in sorted(src.iterdir()):
            write_bytes(f"{bucket}/src/{path.name}", path.read_bytes())
        label = ["label", "--teacher", str(teacher), "--input", f"{bucket}/src"]
        label += ["--output", f"{bucket}/labels", "--decode-processes", "0"]
        before = server.requests()
        launcher(label)
        first = server.requests() - before
        before = server.requests()
        launcher(label)
        rerun = server.requests() - before
        before = len(server.calls())
        launcher(
            ["filter", "--input", f"{bucket}/labels", "--output", f"{bucket}/train"]
            + ["--threshold", "0", "--per-class", str(shards), "--shard-size", "100"]
        )
        calls = server.calls()[before:]
        writes = sum(
            1 for method, path in calls if method in ("POST", "PUT") and "/upload/" in path
        )
        outputs = sum(1 for u in walk_files(f"{bucket}/train") if u.endswith(".tar"))
        return {"first": first, "rerun": rerun, "writes": writes, "outputs": outputs}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, nargs=2, default=[20_000, 80_000])
    parser.add_argument("--gcs-shards", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    torch.manual_seed(0)
    teacher = work / "teacher"
    export_run(str(teacher), create_model("rs-mini", num_classes=10), "rs-mini", None)
    small = local_scale(work, teacher, args.shards[0], with_stats=True)
    large = local_scale(work, teacher, args.shards[1], with_stats=False)
    gcs = gcs_scale(work, teacher, args.gcs_shards)
    shutil.rmtree(work)

    def row(name: str, what: str) -> str:
        (s1, m1, a1), (s4, m4, a4) = small[name], large[name]
        return (
            f"| {what} | {s1:.0f} s, {m1 / 1024:.0f} MiB ({a1 / 1024:.0f}) "
            f"| {s4:.0f} s, {m4 / 1024:.0f} MiB ({a4 / 1024:.0f}) "
            f"| {m4 / m1 - 1:+.1%} ({a4 / a1 - 1:+.1%}) |"
        )

    per_shard = gcs["first"] / args.gcs_shards
    # A finished rerun lists the input (a request per 1,000 names) and reads the manifest.
    pages = -(-args.gcs_shards // 1000)
    rerun_130k = gcs["rerun"] - pages + -(-PROJECTED_SHARDS // 1000)
    merge_hours = PROJECTED_SHARDS * REQUEST_SECONDS / 8 / 3600  # reports read 8 at a time
    a, b = args.shards
    stat = small["stats"]
    append(
        "The launcher at scale: tiny shards, local disk and gs://",
        f"python bench/bench_scale.py --shards {a} {b} --gcs-shards {args.gcs_shards}",
        [
            f"| launcher (workers in their own processes): wall, peak RSS (anonymous) "
            f"| {a:,} shards | {b:,} shards | peak RSS change (anonymous) |",
            "|---|---|---|---|",
            row("label_fresh", "label, fresh run"),
            row("label_rerun", "label, finished rerun"),
            row("filter_fresh", "filter, fresh run"),
            row("filter_rerun", "filter, finished rerun"),
            "",
            f"On gs:// (fake-gcs-server, {args.gcs_shards:,} shards of {RECORDS} images, input "
            f"and output on the bucket): a first label run makes {gcs['first']:,} requests "
            f"({per_shard:.1f} per shard, workers included; target <= 10); a finished rerun "
            f"makes {gcs['rerun']} (target <= {50 + args.gcs_shards // 100}). The filter wrote "
            f"{gcs['writes']:,} objects for {gcs['outputs']:,} training shards "
            f"({gcs['writes'] / max(gcs['outputs'], 1):.2f} per output shard, reports "
            "included).",
            "",
            f"Projected to {PROJECTED_SHARDS:,} shards at {REQUEST_SECONDS * 1000:.0f} ms a "
            f"request: a finished rerun costs the launcher {rerun_130k:,} requests (the input "
            f"listed a page per 1,000 names, the manifest read: {rerun_130k * REQUEST_SECONDS:,.1f}"
            " s); a first run's launcher-side work is "
            "two listings before the job (130 requests each), progress polls that back off, "
            f"and one read per shard report at the end, 8 at a time: {merge_hours:.2f} h.",
            "",
            f"`pipeline stats` on the {a:,}-shard label output ({a * RECORDS:,} records): "
            f"{stat['seconds'][0]:.1f} s read from the {stat['sources'][0]} (whole process); "
            f"the full scan (`--scan`, DirectRunner, 2 workers) took {stat['seconds'][1]:.0f} s "
            f"and its counts are {'the same' if stat['same'] else 'NOT the same'} "
            f"({', '.join(SPEC_KEYS)}).",
        ],
        "scale",
        {
            "shards": args.shards,
            "label_rerun_rss_mib": [small["label_rerun"][1] / 1024, large["label_rerun"][1] / 1024],
            "label_rerun_anon_mib": [
                small["label_rerun"][2] / 1024,
                large["label_rerun"][2] / 1024,
            ],
            "gcs_first_requests_per_shard": per_shard,
            "gcs_rerun_requests": gcs["rerun"],
            "projected_launcher_merge_hours": merge_hours,
            "stats_seconds": stat["seconds"],
            "stats_same": stat["same"],
        },
    )


if __name__ == "__main__":
    main()

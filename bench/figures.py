"""The table of current figures at the top of BENCHMARKS.md: one row per measure the spec and
the issues name, its latest figure (read from bench/results/, which each benchmark rewrites),
its target, whether it is met, the date and the command. `record.append` redraws it after
every benchmark, so `make bench` keeps it current; `python bench/figures.py` redraws it alone.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP, LOG = "## Current figures", "## Log"


@dataclass(frozen=True)
class Measure:
    name: str
    result: str  # bench/results/RESULT.json
    figure: Callable[[dict], float]
    shown: str  # format of the figure, e.g. "{:.2f}"
    target: str  # in words
    met: Callable[[float], bool] | None  # None: a figure without a target


def _growth(values: list[float]) -> float:
    return values[-1] / values[0]


def _difference(result: dict, name: str) -> dict:
    """A difference of the demo report by the start of its name: its per-seed values and
    (mean, low, high) of its 95% interval."""
    (found,) = [v for k, v in result["differences"].items() if k.startswith(name)]
    return found


def _cores(result: dict) -> int:
    return int(result["machine"].split()[0])


def _round1_gain(title: str, result: str) -> list[Measure]:
    """The round-1 student's gain over its teacher on the report seeds, by a report: its
    mean, the low end of its 95% CI and its worst seed."""
    name = "round 1 student - round-0 teacher"
    return [
        Measure(
            f"{title}: round-1 student - teacher, points, {what}",
            result,
            figure,
            shown,
            target,
            met,
        )
        for what, figure, shown, target, met in (
            (
                "mean of the report seeds",
                lambda r: _difference(r, name)["mean_ci"][0],
                "{:+.2f}",
                ">= +2",
                lambda x: x >= 2,
            ),
            (
                "low end of the 95% CI",
                lambda r: _difference(r, name)["mean_ci"][1],
                "{:+.2f}",
                "> 0 (>= +2 would establish the mean's goal)",
                lambda x: x > 0,
            ),
            (
                "worst report seed",
                lambda r: min(_difference(r, name)["values"]),
                "{:+.1f}",
                ">= 0",
                lambda x: x >= 0,
            ),
        )
    ]


MEASURES = [
    Measure(
        "label: plain loop time / label time, whole processes",
        "label",
        lambda r: r["ratio_plain_over_label"],
        "{:.2f}",
        ">= 1.0",
        lambda x: x >= 1.0,
    ),
    Measure(
        "label with a timm teacher: plain timm loop / label, whole processes, mean",
        "timm_label",
        lambda r: r["ratio"],
        "{:.2f}",
        ">= 1.0",
        None,
    ),
    Measure(
        "label with a timm teacher: plain timm loop / label, low end of the 95% CI",
        "timm_label",
        lambda r: r["ratio_ci"][0],
        "{:.2f}",
        ">= 1.0 (establishes the mean's target)",
        lambda x: x >= 1.0,
    ),
    Measure(
        "label, decode-bound: plain loop / label, per core of the machine",
        "label",
        lambda r: r["ratio_decode_bound"] / _cores(r),
        "{:.2f}",
        ">= 0.65",
        lambda x: x >= 0.65,
    ),
    Measure(
        "label: driving thread's time per image outside the forward (us)",
        "drive",
        lambda r: r["now"]["outside_us_per_image"],
        "{:.1f}",
        "<= 30",
        lambda x: x <= 30,
    ),
    Measure(
        "label: peak memory, 4x corpus / 1x",
        "label",
        lambda r: _growth(r["peak_rss_mib"]),
        "{:.2f}",
        "flat (<= 1.10)",
        lambda x: x <= 1.10,
    ),
    Measure(
        "label: bytes per sidecar record (payload + tar)",
        "label",
        lambda r: r["sidecar_bytes_per_record"],
        "{:.0f}",
        "reported",
        None,
    ),
    Measure(
        "stored top-16: KL(full distribution, stored top-k), mean, 1,000 classes",
        "topk",
        lambda r: r["classes_1000"][-1]["kl_spread_mean"],
        "{:.3f}",
        "reported",
        None,
    ),
    Measure(
        "filter: plain loop time / filter time",
        "filter",
        lambda r: r["ratio_plain_over_filter"],
        "{:.2f}",
        ">= 1.0",
        lambda x: x >= 1.0,
    ),
    Measure(
        "filter: peak memory, 4x corpus / 1x",
        "filter",
        lambda r: _growth(r["peak_rss_mib"]),
        "{:.2f}",
        "flat (<= 1.10)",
        lambda x: x <= 1.10,
    ),
    Measure(
        "student step: shard loader / in-memory batches",
        "train",
        lambda r: r["ratio_loader_over_memory"],
        "{:.3f}",
        "<= 1.05",
        lambda x: x <= 1.05,
    ),
    Measure(
        "student step: share waiting for data",
        "train",
        lambda r: 100 * r["data_wait"],
        "{:.1f}%",
        "<= 5%",
        lambda x: x <= 5,
    ),
    Measure(
        "student loader: images/s per core / bare loop (rs-50 at 160 px)",
        "loader",
        lambda r: r["rs-50@160"]["ratio"],
        "{:.3f}",
        ">= 0.95",
        lambda x: x >= 0.95,
    ),
    Measure(
        "student loader: images/s per core / bare loop (rs-152 at 256 px)",
        "loader",
        lambda r: r["rs-152@256"]["ratio"],
        "{:.3f}",
        ">= 0.95",
        lambda x: x >= 0.95,
    ),
    Measure(
        "launcher: requests of a finished rerun over 1,000 gs:// shards",
        "scale",
        lambda r: r["gcs_rerun_requests"],
        "{:.0f}",
        "<= 50 + S/100 = 60",
        lambda x: x <= 60,
    ),
    Measure(
        "launcher: label rerun memory, 80,000 / 20,000 shards",
        "scale",
        lambda r: _growth(r["label_rerun_rss_mib"]),
        "{:.2f}",
        "flat (<= 1.10)",
        lambda x: x <= 1.10,
    ),
    Measure(
        "dedup: planted copies found, worst draw and kind",
        "dedup",
        lambda r: (
            100
            * min(
                min(x["recall_min"].values())
                for x in r["results"]
                if x["rule"] == "nearest distinct"
            )
        ),
        "{:.0f}%",
        ">= 95%",
        lambda x: x >= 95,
    ),
    Measure(
        "dedup: distinct images dropped, worst draw",
        "dedup",
        lambda r: (
            100 * max(x["dropped_max"] for x in r["results"] if x["rule"] == "nearest distinct")
        ),
        "{:.2f}%",
        "<= 1%",
        lambda x: x <= 1,
    ),
    *_round1_gain("demo", "demo"),
    *_round1_gain("demo, every digit scored (5 folds)", "demo_folds"),
    Measure(
        "demo: round-1 student - supervised control at matched compute (primary endpoint), "
        "points, low end of the 95% CI",
        "demo",
        lambda r: _difference(r, "round 1 student - supervised control")["mean_ci"][1],
        "{:+.2f}",
        "> 0",
        lambda x: x > 0,
    ),
    Measure(
        "demo: round 2 - round 1, points, mean of the report seeds",
        "demo",
        lambda r: _difference(r, "round 2 student - round 1 student")["mean_ci"][0],
        "{:+.2f}",
        ">= +0.5",
        lambda x: x >= 0.5,
    ),
    Measure(
        "demo: round 2 - round 1, points, low end of the 95% CI",
        "demo",
        lambda r: _difference(r, "round 2 student - round 1 student")["mean_ci"][1],
        "{:+.2f}",
        "> 0",
        lambda x: x > 0,
    ),
    Measure(
        "demo: stage seconds of make demo's round 1 (seed 0), alone on the machine",
        "demo",
        lambda r: r["round1_quiet_s"],
        "{:.0f}",
        "<= 240 (4 minutes)",
        lambda x: x <= 240,
    ),
    Measure(
        "train: explicit host reads per step (item, bool, int, ...), the step itself",
        "device_paths",
        lambda r: r["step_reads_per_step"],
        "{:.1f}",
        "0",
        lambda x: x == 0,
    ),
    Measure(
        "train: explicit host reads per step, the EMA update (torch's AveragedModel: 2.8)",
        "device_paths",
        lambda r: r["ema_reads_per_step"],
        "{:.1f}",
        "0",
        lambda x: x == 0,
    ),
    Measure(
        "label: device decoder calls for 256 JPEGs with one refused",
        "device_paths",
        lambda r: r["refused_jpeg"]["decode_calls"],
        "{:.0f}",
        "<= 2 log2 n + 1 = 17",
        lambda x: x <= 17,
    ),
    Measure(
        "train: micro-batch that fits a 40 GiB GPU, rs-152 (activations measured on CPU)",
        "micro",
        lambda r: r["rs-152"]["micro_batch"],
        "{:.0f}",
        "reported",
        None,
    ),
]
# Named by the spec, measured only on a GPU: no GPU has been lent to the machine the figures
# come from (bench/gpu_check.py measures them where one is).
ON_A_GPU = [
    ("label on a GPU: images/s / bare bf16 forward", ">= 0.9"),
    ("label on a GPU: images/s of rs-152 at 256 px in bf16", "reported"),
    ("label on a GPU: top-1 agreement of CPU and device decoding", ">= 95%"),
    ("label on a GPU: repeat device decodes of one batch on two threads, pixel-exact", "100/100"),
    ("label on a GPU: images/s per decode core", "reported"),
    ("train on a GPU: data-wait share of the loader-fed step", "<= 5%"),
    ("train on a GPU: synchronising calls per step, step and EMA (CUDA's own count)", "0"),
    ("label: projected GPU-hours for 130M images", "reported"),
]


def rows() -> list[str]:
    lines = [
        "| measure | figure | target | met | date | command |",
        "|---|---|---|---|---|---|",
    ]
    for m in MEASURES:
        path = ROOT / "bench" / "results" / f"{m.result}.json"
        result = json.loads(path.read_text()) if path.exists() else None
        if result is None:
            lines.append(f"| {m.name} | not measured | {m.target} | - | - | - |")
            continue
        value = m.figure(result)
        met = "-" if m.met is None else ("yes" if m.met(value) else "**no**")
        lines.append(
            f"| {m.name} | {m.shown.format(value)} | {m.target} | {met} | {result['date']} | "
            f"`{result['command']}` |"
        )
    for name, target in ON_A_GPU:
        lines.append(
            f"| {name} | not measured (no GPU) | {target} | - | - | `bench/gpu_check.py` |"
        )
    return lines


def write_table(path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Redraw the table between the two headings; the log below is left as it is."""
    text = path.read_text()
    head, _, rest = text.partition(TOP + "\n")
    _, _, log = rest.partition(LOG + "\n")
    if not rest or not log:
        sys.exit(f"{path} lacks its '{TOP}' and '{LOG}' headings")
    table = "\n".join(rows())
    path.write_text(f"{head}{TOP}\n\n{table}\n\n{LOG}\n{log}")


if __name__ == "__main__":
    write_table()

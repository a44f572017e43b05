"""The GPU check script runs where there is no GPU too (tiny sizes, `--device cpu`), so it
is known to work before a GPU machine's minutes are spent on it."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def test_gpu_check_runs_on_cpu_and_reports_its_figures(tmp_path: Path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "rs-mini", "--size", "32"]
        + ["--batch-size", "8", "--images", "96", "--per-shard", "32", "--sizes", "40-160"]
        + ["--processes", "1", "--threads", "2", "--steps", "2", "--json", str(out)]
        + ["--train-models", "rs-mini:32", "--micro-batch", "8", "--train-workers", "1"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["cores"] >= 1 and figures["torch"] and figures["driver"] is None
    label = figures["label"]
    assert label["bare_forward_img_s"] > 0 and label["bare_compiled_img_s"] > 0
    cpu, device = label["label_cpu_decode"], label["label_device_decode"]
    # Web variety: the same images labeled and dropped either way; the device path takes
    # the JPEGs it can and leaves the rest to the CPU.
    assert cpu["images"] == device["images"] and 80 <= cpu["images"] < 96
    assert cpu["dropped"] == device["dropped"] == 96 - cpu["images"]
    assert cpu["on_device"] == 0 and cpu["on_cpu"] == 96
    assert device["on_device"] > 0.6 * 96 and device["on_cpu"] > 0
    for rate in (cpu, device):
        assert rate["img_s"] > 0 and 0 <= rate["stall_share"] <= 1
        assert abs(rate["over_bare"] - rate["img_s"] / label["bare_forward_img_s"]) < 0.01
    # Training: the trainer's own step on synthetic pixels (eager, compiled) and its epoch
    # loop fed by the real loader from shards.
    train = figures["train"]["rs-mini@32"]
    assert train["micro_batch"] == 8
    for case in ("synthetic_eager", "synthetic_compiled", "loader"):
        assert train[case]["img_s"] > 0, case
    assert train["synthetic_eager"]["peak_mib"] is None  # GPU memory only on a GPU
    assert 0 <= train["loader"]["data_wait"] < 1
    assert abs(train["loader"]["over_synthetic"] * train["synthetic_eager"]["img_s"]
               - train["loader"]["img_s"]) < 0.5  # fmt: skip

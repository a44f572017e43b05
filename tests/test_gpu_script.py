"""The GPU check script runs where there is no GPU too (tiny sizes, `--device cpu`), so it
is known to work before a GPU machine's minutes are spent on it."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_label.py"


def test_gpu_label_script_runs_on_cpu_and_reports_its_figures(tmp_path: Path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "rs-mini", "--size", "32"]
        + ["--batch-size", "8", "--images", "48", "--per-shard", "16", "--web-size", "64x48"]
        + ["--decode-processes", "1", "--steps", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["label_cpu_decode_images"] == 48
    assert figures["bare_forward_img_s"] > 0 and figures["label_cpu_decode_img_s"] > 0
    ratio = figures["label_cpu_decode_img_s"] / figures["bare_forward_img_s"]
    assert abs(figures["label_cpu_decode_over_bare"] - ratio) <= 0.01 * ratio + 0.001

"""The GPU check script runs where there is no GPU too (`--device cpu` sizes everything
tiny), so it is known to work before a GPU machine's minutes are spent on it; and its
decode and label sections run where webdataset and Beam are not installed, as on a rented
GPU image that brings its own PyTorch."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


@pytest.fixture
def scratch() -> Iterator[Path]:
    """The script's TMPDIR, to see it left nothing there: a short path of its own in the
    system's temporary folder (below pytest's, the decode pool's socket path would pass the
    108 characters a Unix socket may have)."""
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-test-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _check(scratch: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "TMPDIR": str(scratch), **(env or {})},
    )


def test_gpu_check_runs_on_cpu_reports_its_figures_and_removes_what_it_wrote(
    scratch: Path, tmp_path: Path
):
    out = tmp_path / "figures.json"
    result = _check(scratch, "--processes", "1", "--train-workers", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [p for p in scratch.iterdir() if p.name.startswith("gpu-check-")]  # all gone
    steps = [line for line in result.stderr.splitlines() if line.startswith("[gpu_check")]
    assert "estimated" in steps[0] and len(steps) >= 8 and "done in" in steps[-1]
    figures = json.loads(out.read_text())
    assert figures["cores"] >= 1 and figures["torch"] and figures["driver"] is None

    decode = figures["decode"]
    assert decode["repeat_decodes_pixel_exact"] == "10/10"  # 5 on each of two threads
    refused = decode["refused_jpegs"]
    # A whole JPEG the decoder refuses costs a bisection of the chunk (9 images: 1 + 2 x 3
    # calls at most), and goes to the CPU, which names its reason; a cut one never goes.
    assert refused["bad_huffman_table"]["outcome"] == "undecodable_image"
    assert 1 < refused["bad_huffman_table"]["decode_calls"] <= 1 + 2 * 4
    assert refused["cut_short"]["offered_to_device"] is False
    assert refused["cut_short"]["outcome"] == "truncated_image"

    label = figures["label"]
    cpu, device = label["label_cpu_decode"], label["label_device_decode"]
    # Web variety: the same images labeled and dropped either way; the device path takes
    # the JPEGs it can and leaves the rest to the CPU; the two agree on the top-1 class.
    assert cpu["images"] == device["images"] and 80 <= cpu["images"] < 96
    assert cpu["dropped"] == device["dropped"] == 96 - cpu["images"]
    assert cpu["on_device"] == 0 and cpu["on_cpu"] == 96
    assert device["on_device"] > 0.6 * 96 and device["on_cpu"] > 0
    assert label["keys_compared"] == cpu["images"] and label["top1_agreement_cpu_vs_device"] >= 0.95
    for rate in (cpu, device):
        assert rate["img_s"] > 0 and 0 <= rate["stall_share"] <= 1
        assert abs(rate["over_bare"] - rate["img_s"] / label["bare_forward_img_s"]) < 0.01
    assert label["gpu_hours_for_130M_images"] > 0

    train = figures["train"]["rs-mini@32"]
    assert train["micro_batch"] == 8 and "synthetic_compiled" not in train  # --compile-train
    assert train["synthetic_eager"]["img_s"] > 0 and train["loader"]["img_s"] > 0
    assert train["synthetic_eager"]["peak_mib"] is None  # GPU memory only on a GPU
    assert 0 <= train["loader"]["data_wait"] < 1


def test_decode_and_label_sections_need_neither_webdataset_nor_beam(scratch: Path, tmp_path: Path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("webdataset", "apache_beam", "faiss"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    path = os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])
    result = _check(
        scratch, "--sections", "decode,label", "--processes", "1", env={"PYTHONPATH": path}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"top1_agreement_cpu_vs_device"' in result.stdout

"""Shared fixtures: real shards written through the project's own commands."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Cloud clients talk only to the servers the tests start on 127.0.0.1, with anonymous or
# dummy credentials: never to a metadata server or a real account. Set before any client
# (fsspec reads FSSPEC_* at import, gcsfs the emulator address when first imported), and
# inherited by every `pipeline` process a test starts.
os.environ.update(
    NO_GCE_CHECK="True",
    GCE_METADATA_HOST="127.0.0.1:9",
    FSSPEC_GS_TOKEN="anon",
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)

import numpy as np
import pytest
import torch
from PIL import Image

from rs_pseudolabel.data.digits import write_digits

DIGITS_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"

# Training decides some outcomes here (a teacher's embeddings, an accuracy bound). Floating
# point sums depend on how many threads share them, so every machine trains with the same
# count, in this process and in those the tests start, and only with deterministic kernels:
# a result measured here is the result on any fresh clone. One thread, as loader workers and
# Beam workers take the other cores; two threads on a busy machine spin at every barrier.
THREADS = 1
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)
torch.use_deterministic_algorithms(True)


@pytest.fixture(autouse=True)
def _same_torch_settings():
    """Every test starts with the settings above, whatever a test before it in this worker
    set (some set their own thread count), so none depends on which ran first."""
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    yield


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded corpus, written once per test session."""
    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out), labeled=200, seed=0)
    return out


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run `pipeline ARGS...` as a user would: a separate process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", *args],
        capture_output=True,
        text=True,
        check=check,
    )


def message_lines(stderr: str) -> list[str]:
    """What a command said on stderr, its progress bars left out (a bar's updates are lines
    of their own when stderr is not a terminal)."""
    bar = re.compile(r"\[\d+:\d\d(:\d\d)?[<,]")  # tqdm's elapsed time: "[00:04<00:10, ..."
    return [line for line in stderr.splitlines() if line.strip() and not bar.search(line)]


def kill_midway(args: list[str], ready: Callable[[], bool], timeout: float = 120) -> None:
    """Start `pipeline ARGS`, and SIGKILL it the moment `ready()` holds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_shards(expected: Path, actual: Path) -> list[str]:
    """The same shard names with the same bytes, member for member."""
    names = sorted(p.name for p in expected.glob("*.tar"))
    assert sorted(p.name for p in actual.glob("*.tar")) == names
    for name in names:
        assert (actual / name).read_bytes() == (expected / name).read_bytes(), name
    return names


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    """A real encoded image with some structure, in any Pillow mode."""
    rng = np.random.default_rng(sum(map(ord, mode)) + size[0])
    if mode in ("I;16", "I"):
        arr = rng.integers(0, 65535, size[::-1], dtype=np.uint16)
        img = Image.fromarray(arr if mode == "I;16" else arr.astype(np.int32))
    else:
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        img = img.convert(mode) if mode != "RGB" else img
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def hostile_samples() -> list[dict]:
    """One sample of every kind a scraped corpus throws at the decoder: odd modes, broken
    or empty bytes, no image at all."""
    return [
        {"__key__": "cmyk", "jpg": image_bytes("CMYK", fmt="JPEG")},
        {"__key__": "gray16", "png": image_bytes("I;16")},
        {"__key__": "alpha", "png": image_bytes("RGBA")},
        {"__key__": "tiny", "png": image_bytes(size=(1, 1))},
        {"__key__": "empty", "jpg": b""},
        {"__key__": "text", "jpg": b"just some text"},
        {"__key__": "cut", "jpg": image_bytes(size=(300, 300), fmt="JPEG")[:4000]},
        {"__key__": "noimage", "txt": b"caption only"},
    ]


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rs-mini with random weights as a run directory: labels as fast as a trained teacher,
    for every test of the stages' mechanics rather than of accuracy."""
    from rs_pseudolabel.teachers import create_model, export_run

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("random-teacher")
    export_run(
        str(out), create_model("rs-mini", num_classes=10), "rs-mini", [str(i) for i in range(10)]
    )
    return out


@pytest.fixture(scope="session")
def trained_teacher(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real round-0 teacher: rs-mini trained on the 200 labeled digits by the project's
    trainer. Without RandAugment it is confident in half the steps of the demo's teacher,
    and the tests need its labels and embeddings, not its noise. Trained in a process of its
    own, as a user runs it: the same weights bit for bit whichever tests this worker ran
    before (in-process, a filter test passed or failed with the order of the test files)."""
    out = tmp_path_factory.mktemp("teacher")
    run_cli(
        "train-student", "--labeled", str(digits_dir / "labeled"), "--out", str(out),
        "--model", "rs-mini", "--config", str(DIGITS_RECIPE), "--epochs", "15",
        "--set", "epoch_samples=640", "--set", "randaugment_ops=0", check=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory):
    """fake-gcs-server on 127.0.0.1 for the whole session (see tests/servers.py)."""
    from tests.servers import start_gcs

    server = start_gcs(tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server on 127.0.0.1 for the whole session (see tests/servers.py)."""
    from tests.servers import start_s3

    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def digits1000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits with 1,000 labeled, for the trainer's tests (a module's own copy)."""
    out = tmp_path_factory.mktemp("digits1000")
    write_digits(str(out), labeled=1000, seed=0)
    return out

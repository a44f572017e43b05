"""`pipeline label` end to end: real shards, a real (random-weight) teacher, a real Beam job."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions, WorkerOptions

from bench.fixtures import write_shard
from rs_pseudolabel.data.digits import write_digits
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import PSEUDO_EXT, decode_pseudo, read_header
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.pipeline import worklist
from rs_pseudolabel.pipeline.beam_options import beam_options, workers_in_process
from rs_pseudolabel.pipeline.label import LabelArgs, run
from rs_pseudolabel.pipeline.worklist import WORK
from tests.conftest import (
    assert_same_shards,
    hostile_samples,
    image_bytes,
    kill_midway,
    message_lines,
    run_cli,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unlabeled digits in 16 small shards."""
    out = tmp_path_factory.mktemp("corpus")
    write_digits(str(out), labeled=200, seed=0, shard_size=80)
    return out / "unlabeled"


def _label(teacher: Path, src: str, out: Path, *beam_args: str, **kw) -> dict:
    return run(LabelArgs(teacher=str(teacher), input=src, output=str(out), **kw), list(beam_args))


def _sidecar(url: str) -> tuple[dict, list]:
    samples = list(iter_samples([url], lambda d: None))
    header = read_header(samples[0])
    return header, [decode_pseudo(s["__key__"], s[PSEUDO_EXT]) for s in samples[1:]]


def test_labels_every_sample_one_sidecar_per_shard_in_order(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    manifest = _label(random_teacher, str(corpus), tmp_path, batch_size=16, embed=True)
    sources = expand_shards(str(corpus))
    assert [Path(u).name for u in expand_shards(str(tmp_path))] == [Path(u).name for u in sources]
    assert manifest["samples_in"] == manifest["samples_out"] == 1300 and manifest["dropped"] == 0
    header, labels = _sidecar(str(tmp_path / Path(sources[3]).name))
    src_keys = [s["__key__"] for s in iter_samples([sources[3]], lambda d: None)]
    assert [lab.key for lab in labels] == src_keys
    assert header["teacher"] == manifest["teacher"] and header["source"] == sources[3]
    for lab in labels:
        assert len(lab.indices) == 10 and abs(float(lab.probs.astype("float32").sum()) - 1) < 0.01
        assert lab.confidence == pytest.approx(float(lab.probs[0]), abs=1e-3)
        assert (
            lab.embedding is not None
            and abs(float((lab.embedding.astype("float32") ** 2).sum()) - 1) < 0.01
        )


def test_rerun_is_a_no_op_and_output_does_not_depend_on_worker_count(
    random_teacher: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    one = tmp_path / "one"
    two = tmp_path / "two"
    _label(random_teacher, str(corpus), one, "--direct_num_workers=1")
    # As a job of thousands of shards runs: several shards to a Beam element.
    monkeypatch.setattr(worklist, "SPANS", 3)
    _label(random_teacher, str(corpus), two, "--direct_num_workers=2")
    monkeypatch.undo()
    assert not list((two / WORK).glob("*")), "the job's work list is removed once it has run"
    before = {p.name: p.stat().st_mtime_ns for p in one.glob("*.tar")}
    again = _label(random_teacher, str(corpus), one)
    assert again["already_done"] and again["shards"] == len(expand_shards(str(corpus))) == 17
    assert {p.name: p.stat().st_mtime_ns for p in one.glob("*.tar")} == before
    for shard in one.glob("*.tar"):
        assert shard.read_bytes() == (two / shard.name).read_bytes()


def test_output_does_not_depend_on_the_number_of_decode_processes(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    src = str(corpus / "unlabeled-00000{0..2}.tar")
    for processes in (0, 1, 3):
        _label(random_teacher, src, tmp_path / str(processes), decode_processes=processes)
    for shard in (tmp_path / "0").glob("*.tar"):
        for processes in (1, 3):
            assert shard.read_bytes() == (tmp_path / str(processes) / shard.name).read_bytes()


def test_pipeline_pickles_and_runs_under_multi_processing(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    src = str(corpus / "unlabeled-00000{0..3}.tar")
    manifest = _label(
        random_teacher,
        src,
        tmp_path / "mp",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    )
    _label(random_teacher, src, tmp_path / "inline", "--direct_num_workers=1")
    assert manifest["samples_out"] == 320
    for shard in (tmp_path / "mp").glob("*.tar"):
        assert shard.read_bytes() == (tmp_path / "inline" / shard.name).read_bytes()


def _hostile_corpus(root: Path) -> str:
    good = [
        {"__key__": f"ok{i}", "jpg": image_bytes(size=(30 + i, 20), fmt="JPEG")} for i in range(5)
    ]
    dotted = {"__key__": "photo", "v2.001.png": image_bytes()}  # photo.v2.001.png in the tar
    write_shard(str(root / "a-000000.tar"), good + hostile_samples() + [dotted])
    write_shard(
        str(root / "a-000001.tar"),
        [{"__key__": f"t{i}", "jpg": image_bytes(size=(200, 200), fmt="JPEG")} for i in range(6)],
    )
    data = (root / "a-000001.tar").read_bytes()
    (root / "a-000001.tar").write_bytes(data[: len(data) * 2 // 3])
    return str(root)


def test_hostile_corpus_every_sample_labeled_or_listed_with_a_reason(
    random_teacher: Path, tmp_path: Path
):
    src = _hostile_corpus(tmp_path / "src")
    out = tmp_path / "out"
    result = run_cli(
        "label", "--teacher", str(random_teacher), "--input", src, "--output", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    dropped = {e["key"]: e["reason"] for e in errors if e["key"]}
    assert dropped == {
        "empty": "empty_image",
        "text": "undecodable_image",
        "cut": "truncated_image",
        "noimage": "no_image",
        "photo": "no_image",
    }
    detail = next(e["detail"] for e in errors if e["key"] == "photo")
    assert "'v2.001.png' is an image whose file name had a dot" in detail, detail
    assert manifest["samples_out"] + manifest["dropped"] == manifest["samples_in"]
    labeled = {lab.key for url in expand_shards(str(out)) for lab in _sidecar(url)[1]}
    assert {"ok0", "cmyk", "gray16", "alpha", "tiny"} <= labeled
    assert 1 <= len([k for k in labeled if k.startswith("t")]) < 6
    assert manifest["shard_faults"] == {"truncated_shard": 1}
    assert f"Labeled {manifest['samples_out']} of {manifest['samples_in']}" in result.stdout


def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    args = ["label", "--teacher", str(random_teacher), "--input", str(corpus), "--batch-size", "8"]
    run_cli(*args, "--output", str(tmp_path / "whole"), check=True)
    killed = tmp_path / "killed"
    kill_midway(
        [*args, "--output", str(killed)], lambda: len(list(killed.glob("_reports/*.json"))) >= 4
    )
    assert len(list(killed.glob("*.tar"))) < 17
    run_cli(*args, "--output", str(killed), check=True)
    assert_same_shards(tmp_path / "whole", killed)
    assert json.loads((killed / "manifest.json").read_text())["samples_out"] == 1300


def test_dataflow_options_reach_the_runner_unchanged():
    options = beam_options(
        "DataflowRunner",
        [
            "--project=my-proj",
            "--region=us-central1",
            "--temp_location=gs://bucket/tmp",
            "--sdk_container_image=us-docker.pkg.dev/my-proj/rs/worker:1",
            "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
            "--machine_type=g2-standard-4",
        ],
    )
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region, gcp.temp_location) == (
        "my-proj",
        "us-central1",
        "gs://bucket/tmp",
    )
    assert gcp.dataflow_service_options == [
        "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
    ]
    assert options.view_as(WorkerOptions).machine_type == "g2-standard-4"
    assert options.get_all_options()["runner"] == "DataflowRunner"
    assert "direct_num_workers" not in " ".join(options.get_all_options(drop_default=True))
    with pytest.raises(UsageError, match="temp_locaton"):
        beam_options(None, ["--temp_locaton=gs://typo"])


@pytest.mark.parametrize(
    ("runner", "args", "in_process"),
    [
        (None, [], True),
        (None, ["--direct_running_mode=in_memory"], True),
        (None, ["--direct_running_mode=multi_processing"], False),
        ("DataflowRunner", ["--project=p", "--region=r", "--temp_location=gs://b/t"], False),
    ],
)
def test_the_launcher_warms_the_decode_pool_only_for_workers_in_its_process(
    runner: str | None, args: list[str], in_process: bool
):
    """A pool started by the launcher serves its own threads, never another process's."""
    assert workers_in_process(beam_options(runner, args)) is in_process


@pytest.mark.parametrize(
    ("runner", "args"),
    [
        ("FlinkRunner", ["--flink_master=flink-jm:8081", "--parallelism=64"]),
        ("SparkRunner", ["--spark_master_url=spark://spark-master:7077"]),
        ("PortableRunner", ["--job_endpoint=localhost:8099"]),
    ],
)
def test_portable_runner_options_reach_the_runner_unchanged(runner: str, args: list[str]):
    """The README's Flink, Spark and job-server commands: every option arrives as given, and
    none of the DirectRunner defaults is added."""
    image = ["--environment_type=DOCKER", "--environment_config=registry/rs/worker:0.1"]
    given = beam_options(runner, [*args, *image]).get_all_options(drop_default=True)
    expected = {"runner": runner}
    for arg in [*args, *image]:
        key, value = arg.removeprefix("--").split("=", 1)
        expected[key] = int(value) if value.isdigit() else value
    assert given == expected


def test_model_name_without_weights_is_one_line_exit_2(corpus: Path, tmp_path: Path):
    result = run_cli(
        "label", "--teacher", "rs-50", "--input", str(corpus), "--output", str(tmp_path)
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--weights" in result.stderr


def test_imagenet_cls_and_img2dataset_shards_are_labeled_as_they_are(
    random_teacher: Path, tmp_path: Path
):
    src = tmp_path / "src"
    write_shard(
        str(src / "imagenet-train-000000.tar"),
        [
            {
                "__key__": f"n01440764_{i}",
                "JPEG": image_bytes(size=(40, 30 + i), fmt="JPEG"),
                "cls": b"0",
            }
            for i in range(5)
        ],
    )
    write_shard(
        str(src / "laion-000000.tar"),
        [
            {
                "__key__": f"{i:09d}",
                "jpg": image_bytes(size=(20 + i, 20), fmt="JPEG"),
                "json": b'{"url": "http://example.org/x.jpg"}',
                "txt": b"a caption",
            }
            for i in range(4)
        ],
    )
    manifest = _label(random_teacher, str(src), tmp_path / "out")
    assert manifest["samples_in"] == manifest["samples_out"] == 9
    keys = [lab.key for url in expand_shards(str(tmp_path / "out")) for lab in _sidecar(url)[1]]
    assert keys == [f"n01440764_{i}" for i in range(5)] + [f"{i:09d}" for i in range(4)]


def test_cuda_asked_of_a_worker_without_a_gpu_is_one_line_and_blocks_no_rerun(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    """The launcher needs no GPU and takes `--device cuda` as it is; the worker that loads
    the teacher finds none, records it, and the launcher says so in one line and gives the
    folder back."""
    out = tmp_path / "out"
    result = run_cli(
        "label", "--teacher", str(random_teacher), "--input", str(corpus / "unlabeled-000000.tar"),
        "--output", str(out), "--device", "cuda",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert lines == [
        "pipeline label: error: --device cuda was asked for, but this worker sees no CUDA device"
    ]
    assert "Traceback" not in result.stderr
    # Refused before any shard was labeled: nothing claims the folder, so the corrected
    # command runs, as it would have on an empty folder.
    assert not out.exists()
    result = run_cli(
        "label", "--teacher", str(random_teacher), "--input", str(corpus / "unlabeled-000000.tar"),
        "--output", str(out), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_local_runner_is_named_never_prism_by_whether_a_download_succeeds(
    random_teacher: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from apache_beam.runners.direct.direct_runner import SwitchingDirectRunner
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.prism_runner import PrismRunner

    def refused(*args, **kwargs):
        raise AssertionError("this runner must not be tried")

    ran = []
    real = fn_runner.FnApiRunner.run_pipeline
    monkeypatch.setattr(PrismRunner, "run_pipeline", refused)
    monkeypatch.setattr(SwitchingDirectRunner, "run_pipeline", refused)
    monkeypatch.setattr(
        fn_runner.FnApiRunner, "run_pipeline", lambda *a, **k: ran.append(1) or real(*a, **k)
    )
    for runner in (None, "DirectRunner"):
        args = LabelArgs(
            teacher=str(random_teacher), input=str(corpus / "unlabeled-000000.tar"),
            output=str(tmp_path / str(runner)), runner=runner,
        )  # fmt: skip
        assert run(args, [])["samples_out"] == 80
    assert len(ran) == 2


@pytest.mark.parametrize("whom", ["process", "group"])
def test_sigterm_ends_label_in_one_line_and_the_rerun_finishes_the_job(
    random_teacher: Path, corpus: Path, tmp_path: Path, whom: str
):
    """What schedulers and `docker stop` send ends the command as Ctrl-C does: one line,
    exit 143, no abort of the runner's threads, no leaked semaphores, nothing left running.
    Sent to the whole process group (a terminal's Ctrl-C, `kill -- -PGID`), it reaches the
    command alone: its decode processes live in a group of their own, since one killed while
    it waited for a task held the pool's queue lock and the shutdown then waited for ever."""
    out = tmp_path / "out"
    args = ["label", "--teacher", str(random_teacher), "--input", str(corpus), "--batch-size", "8"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", *args, "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(out.glob("_reports/*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    if whom == "group":
        groups = {os.getpgid(int(pid)) for pid in _children(proc.pid)}
        assert len(groups) > 1 and proc.pid in groups  # the decode processes' is another
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert message_lines(stderr) == [
        "pipeline label: stopped by SIGTERM; rerun the same command to resume"
    ], stderr
    run_cli(*args, "--output", str(out), check=True)
    assert json.loads((out / "manifest.json").read_text())["samples_out"] == 1300


def _children(pid: int) -> list[str]:
    """The pids of a process's descendants, from /proc."""
    found, todo = [], [str(pid)]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            kids = task.read_text().split()
            found += kids
            todo += kids
    return found


def test_label_run_from_a_script_without_a_main_guard_works(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    """multiprocessing's decode processes would import the script again and, unguarded, run
    the job again inside each of them without end: they import nothing of it."""
    script = tmp_path / "label_it.py"
    script.write_text(
        "from rs_pseudolabel.pipeline.label import LabelArgs, run\n"
        f"args = LabelArgs(teacher={str(random_teacher)!r}, input={str(corpus)!r}, "
        f"output={str(tmp_path / 'out')!r}, decode_processes=2)\n"
        "print('labeled', run(args, [])['samples_out'])\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "labeled 1300" in result.stdout
    assert "Traceback" not in result.stderr and "leaked" not in result.stderr


def test_a_corpus_of_damaged_shards_alone_is_refused_not_labeled_as_empty(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    """Every shard damaged (empty, or random bytes): exit 0 with an empty label output lost
    the whole input without a failure; it is one line, and the folder is given back so that
    the rerun over the restored shards starts afresh."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-000000.tar").write_bytes(b"")
    (src / "a-000001.tar").write_bytes(os.urandom(3000))
    out = tmp_path / "out"
    result = run_cli("label", "--teacher", str(random_teacher), "--input", str(src),
                     "--output", str(out))  # fmt: skip
    assert result.returncode == 2 and message_lines(result.stderr) == [
        f"pipeline label: error: no sample of {src} could be read: its shards are damaged "
        "(1 not_a_tar, 1 truncated_shard): restore them and rerun"
    ], result.stderr[-2000:]
    assert not out.exists()
    for i in range(2):  # restored
        shutil.copy(corpus / "unlabeled-000000.tar", src / f"a-00000{i}.tar")
    result = run_cli("label", "--teacher", str(random_teacher), "--input", str(src),
                     "--output", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]

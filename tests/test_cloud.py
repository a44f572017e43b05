"""Every stage on gs:// and s3://, against real object-store servers on 127.0.0.1
(fake-gcs-server, moto), equal to the same stage on the local disk; the Dataflow job built
offline with Beam's own dry run; the label job on a portable runner's worker processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fixtures import write_shard
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import read_header
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.data.storage import read_bytes, read_json, walk_files, write_bytes
from tests.conftest import DIGITS_RECIPE, image_bytes, kill_midway, message_lines, run_cli

README = Path(__file__).resolve().parent.parent / "README.md"
QUICK = ["--epochs", "1", "--batch-size", "32"] + [
    arg for kv in ("epoch_samples=64", "workers=0", "shuffle_buffer=64") for arg in ("--set", kv)
]


def _loop(root: str) -> None:
    """The digits loop, stage by stage, as a user runs it: every input and output under root."""
    steps = [
        ["data", "digits", "--out", f"{root}/data", "--labeled", "100", "--shard-size", "400"],
        ["train-student", "--model", "rs-mini", "--labeled", f"{root}/data/labeled"]
        + ["--out", f"{root}/teacher", "--config", str(DIGITS_RECIPE), *QUICK],
        ["label", "--teacher", f"{root}/teacher", "--input", f"{root}/data/unlabeled"]
        + ["--output", f"{root}/labels", "--batch-size", "64"],
        ["filter", "--input", f"{root}/labels", "--output", f"{root}/train"]
        + ["--threshold", "0", "--per-class", "60", "--shard-size", "100"],
        ["stats", f"{root}/train", "--scan", "--json", f"{root}/stats.json"],
        ["train-student", "--model", "rs-mini", "--labeled", f"{root}/data/labeled"]
        + ["--pseudo", f"{root}/train", "--out", f"{root}/student"]
        + ["--config", str(DIGITS_RECIPE), *QUICK],
        ["eval", "--checkpoint", f"{root}/student", "--data", f"{root}/data/val"]
        + ["--json", f"{root}/eval.json"],
    ]
    for step in steps:
        result = run_cli(*step)
        assert result.returncode == 0, (step, result.stderr[-3000:])


def _members(url: str) -> list[tuple[str, dict]]:
    """(key, members) of a shard, its header's `source` (a path: local vs bucket) left out."""
    found = []
    for sample in iter_samples([url], lambda d: None):
        header = read_header(sample)
        if header is not None:
            header.pop("source", None)
            found.append(("__shard__", header))
        else:
            found.append((sample["__key__"], {k: v for k, v in sample.items() if k[0] != "_"}))
    return found


def _shards(folder: str) -> dict[str, list]:
    return {url.rsplit("/", 1)[-1]: _members(url) for url in expand_shards(folder)}


@pytest.fixture(scope="module")
def local_loop(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("local-loop"))
    _loop(root)
    return root


@pytest.mark.parametrize("store", ["gcs_server", "s3_server"])
def test_digits_loop_on_a_bucket_equals_the_local_disk(
    store: str, local_loop: str, request: pytest.FixtureRequest
):
    server = request.getfixturevalue(store)
    root = server.make_bucket(f"loop-{server.protocol}") + "/work"
    _loop(root)
    teacher = [read_json(f"{r}/teacher/model.json")["weights_sha256"] for r in (root, local_loop)]
    assert teacher[0] == teacher[1], "the round-0 teacher trained alike from the bucket"
    labels = _shards(f"{root}/labels")
    assert labels == _shards(f"{local_loop}/labels") and len(labels) == 4
    first = next(iter_samples(expand_shards(f"{root}/labels")[:1], lambda d: None))
    assert read_header(first)["source"].startswith(f"{server.protocol}://")
    assert _shards(f"{root}/train") == _shards(f"{local_loop}/train")
    assert read_json(f"{root}/stats.json") == read_json(f"{local_loop}/stats.json")
    assert read_json(f"{root}/eval.json") == read_json(f"{local_loop}/eval.json")
    student = [read_json(f"{r}/student/model.json")["weights_sha256"] for r in (root, local_loop)]
    assert student[0] == student[1]
    manifest = read_json(f"{root}/labels/manifest.json")
    assert manifest["state"] == "done" and manifest["samples_out"] == 1400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 real images in 20 small shards: room for a kill to land between two of them."""
    out = tmp_path_factory.mktemp("cloud-corpus")
    for k in range(20):
        write_shard(
            str(out / f"part-{k:06d}.tar"),
            [
                {"__key__": f"s{k:02d}i{i}", "png": image_bytes(size=(24 + i, 24 + k))}
                for i in range(10)
            ],
        )
    return out


def test_sigkill_while_labeling_into_a_bucket_then_rerun(
    gcs_server, random_teacher: Path, corpus: Path, tmp_path: Path
):
    bucket = gcs_server.make_bucket("killed")
    args = ["label", "--teacher", str(random_teacher), "--input", str(corpus), "--batch-size", "4"]
    run_cli(*args, "--output", str(tmp_path / "whole"), check=True)
    out = f"{bucket}/labels"
    kill_midway(
        [*args, "--output", out, "--direct_num_workers=1"],
        lambda: len([u for u in walk_files(out) if "/_reports/" in u]) >= 3,
    )
    assert len(expand_shards(out)) < 20
    run_cli(*args, "--output", out, check=True)
    assert _shards(out) == _shards(str(tmp_path / "whole"))
    names = [u.removeprefix(out + "/") for u in walk_files(out)]
    assert not [n for n in names if ".tmp-" in n], names
    assert {n for n in names if "/" not in n} == {
        *(f"part-{k:06d}.tar" for k in range(20)),
        "manifest.json",
        "errors.jsonl",
        "classes.json",
        "class_confidences.npy",
    }


def test_two_folders_with_the_same_shard_names_are_both_labeled(
    gcs_server, random_teacher: Path, corpus: Path
):
    bucket = gcs_server.make_bucket("twins")
    for folder in ("a", "b"):
        for k in range(2):
            data = (corpus / f"part-{k:06d}.tar").read_bytes()
            write_bytes(f"{bucket}/{folder}/part-{k:06d}.tar", data)
    spec = f"{bucket}/{{a,b}}/part-{{000000..000001}}.tar"
    result = run_cli(
        "label", "--teacher", str(random_teacher), "--input", spec, "--output", f"{bucket}/out"
    )
    assert result.returncode == 0, result.stderr
    manifest = read_json(f"{bucket}/out/manifest.json")
    assert manifest["samples_in"] == manifest["samples_out"] == 40
    names = [u.rsplit("/", 1)[-1] for u in expand_shards(f"{bucket}/out")]
    assert names == [f"{f}__part-00000{k}.tar" for f in ("a", "b") for k in (0, 1)]


def _readme_command(marker: str) -> list[str]:
    """The command in the README's code block that follows `<!-- marker -->`."""
    text = README.read_text()
    block = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, re.S)
    assert block is not None, f"README has no block after <!-- {marker} -->"
    return shlex.split(block.group(1).replace("\\\n", " "))


def test_readme_dataflow_dry_run_builds_the_real_job_offline(
    gcs_server, random_teacher: Path, corpus: Path, tmp_path: Path
):
    """The README's Dataflow command, option for option: Beam's DataflowRunner builds the job
    (steps, worker image, GPU service option, one SDK process per worker) and submits
    nothing; the CLI writes what was built and no manifest."""
    bucket = gcs_server.make_bucket("my-bucket")
    for path in random_teacher.iterdir():
        write_bytes(f"{bucket}/runs/student1/{path.name}", path.read_bytes())
    for k in range(3):
        write_bytes(
            f"{bucket}/unlabeled/part-{k:06d}.tar", (corpus / f"part-{k:06d}.tar").read_bytes()
        )
    command = _readme_command("dataflow-dry-run")
    assert command[0] == "pipeline" and "--dry_run=True" in command
    script = Path(sys.executable).with_name(command[0])  # the installed `pipeline` command
    result = subprocess.run(
        [str(script), *command[1:]], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Dry run" in result.stdout
    job = json.loads((tmp_path / command[command.index("--describe-job") + 1]).read_text())
    image = command[command.index("--sdk_container_image") + 1]
    assert job["runner"] == "DataflowRunner" and job["dry_run"] is True
    assert job["steps"] == ["ListShards", "SpreadShards", "LabelShards"]
    assert job["worker_images"] == [image] and job["sdk_container_image"] == image
    assert any(o.startswith("worker_accelerator=type:") for o in job["dataflow_service_options"])
    assert "no_use_multiple_sdk_containers" in job["experiments"]
    output = command[command.index("--output") + 1]
    assert walk_files(output) == [], "a dry run writes nothing at the output"


def test_filter_dry_run_builds_both_jobs(gcs_server, local_loop: str, tmp_path: Path):
    result = run_cli(
        "filter", "--input", f"{local_loop}/labels", "--output", f"{tmp_path}/train",
        "--runner", "DataflowRunner", "--dry_run=True", "--project", "my-project",
        "--region", "us-central1", "--temp_location", "gs://my-bucket/tmp",
        "--sdk_container_image", "us-central1-docker.pkg.dev/my-project/rs/worker:0.1",
        "--describe-job", str(tmp_path / "job.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["steps"][:3] == ["ListSidecars", "SpreadShards", "CountConfidences"]
    assert "WriteTrainingShards" in job["steps"]
    assert not (tmp_path / "train").exists()


WORKER_POOL = """
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
address, server = BeamFnExternalWorkerPoolServicer.start(use_process=True, port=0)
print(address, flush=True)
server.wait_for_termination()
"""


def test_label_runs_on_a_portable_runner_in_worker_processes(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    """Beam's worker pool runs the DoFns in SDK-harness processes apart from the launcher,
    as on Flink, Spark and Dataflow Runner v2; the output equals the DirectRunner's."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    # The pool binds a port the system picks and prints its address once it listens: no
    # port chosen ahead that another process could take, no sleep standing in for the start.
    pool = subprocess.Popen(
        [sys.executable, "-c", WORKER_POOL],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = pool.stdout.readline().strip()
        assert address.startswith("localhost:"), address
        args = ["label", "--teacher", str(random_teacher), "--input", str(corpus)]
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rs_pseudolabel.pipeline",
                *args,
                "--output",
                str(tmp_path / "portable"),
            ]
            + ["--runner", "PortableRunner", "--job_endpoint", "embed"]
            + ["--environment_type", "EXTERNAL", "--environment_config", address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, stderr = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, stderr[-3000:]
    finally:
        pool.terminate()
        pool.wait()
    run_cli(*args, "--output", str(tmp_path / "direct"), check=True)
    assert _shards(str(tmp_path / "portable")) == _shards(str(tmp_path / "direct"))
    workers = {
        json.loads(read_bytes(str(p)))["worker"].split(":")[1]
        for p in (tmp_path / "portable" / "_reports").iterdir()
    }
    assert workers and str(launcher.pid) not in workers


@pytest.mark.parametrize("command", ["label", "train-student", "stats"])
def test_s3_without_credentials_is_one_line(
    s3_server, random_teacher: Path, tmp_path: Path, command: str
):
    """No credentials anywhere boto looks: one line saying so and exit 2, where botocore's
    NoCredentialsError came as a traceback of 78 (label) and 89 (train-student) lines."""
    bucket = s3_server.make_bucket(f"nocreds-{command}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ACCESS_KEY")}
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    env |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    args = {
        "label": ["--teacher", str(random_teacher), "--input", f"{bucket}/in",
                  "--output", str(tmp_path / "out")],
        "train-student": ["--model", "rs-mini", "--labeled", f"{bucket}/labeled",
                          "--out", str(tmp_path / "run")],
        "stats": [f"{bucket}/labels"],  # its manifest.json was said to be "not valid JSON"
    }[command]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", command, *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "no AWS credentials found" in lines[0], lines
    assert "not valid JSON" not in lines[0]


@pytest.mark.parametrize("server", ["gcs_server", "s3_server"])
def test_a_bucket_that_does_not_exist_is_named_in_one_line(
    request, server: str, random_teacher: Path, digits_dir: Path
):
    protocol = request.getfixturevalue(server).make_bucket(f"there-{server[:3]}").split(":")[0]
    shard = sorted((digits_dir / "unlabeled").glob("*.tar"))[0]
    result = run_cli("label", "--teacher", str(random_teacher), "--input", str(shard),
                     "--output", f"{protocol}://nosuchbucket/labels")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and "there is no bucket 'nosuchbucket'" in lines[0], lines

"""The student trainer on the embedded digits: it learns, alone and under torchrun, ranks
read disjoint shards and keep identical weights, a killed run resumes to the same model,
pseudo-labeled shards train in the same forward pass, and recipe mistakes are one message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from bench.fixtures import write_shard
from rs_pseudolabel.data.digits import write_digits
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import (
    PSEUDO_EXT,
    PseudoLabel,
    content_hash,
    encode_pseudo,
    shard_header,
)
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.teachers import create_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "digits.yaml")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "rs_pseudolabel.pipeline",
        "train-student",
        "--model",
        "rs-mini",
        "--labeled",
        str(data / "labeled"),
        "--val",
        str(data / "val"),
        "--out",
        str(out),
        "--config",
        DEMO,
        *extra,
    ]


def _run(args: list[str], timeout: float = 540) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits1000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits1000")
    write_digits(str(out), labeled=1000, seed=0)
    return out


@pytest.fixture(scope="module")
def demo_run(digits1000: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run of the demo recipe, shared by the tests below."""
    out = tmp_path_factory.mktemp("runs") / "single"
    _run([sys.executable, *_train_cmd(digits1000, out)])
    return out


def _pipeline_eval(run: Path, data: Path) -> dict:
    """`pipeline eval --checkpoint RUN --data D/val --json F`, as a user runs it."""
    scores = run / "eval.json"
    _run(
        [
            sys.executable,
            "-m",
            "rs_pseudolabel.pipeline",
            "eval",
            "--checkpoint",
            str(run),
            "--data",
            str(data / "val"),
            "--json",
            str(scores),
        ]
    )
    return json.loads(scores.read_text())


# The demo recipe's 8 epochs on 1,000 labeled digits reach 84% to 91% held-out top-1 over
# seeds 0 to 3 (one thread, deterministic): the bound leaves 9 points for another machine.
REACHES = 0.75


def test_single_process_student_reaches_75_percent(demo_run: Path, digits1000: Path):
    metrics = _pipeline_eval(demo_run, digits1000)
    assert metrics["samples"] == 297 and metrics["dropped"] == 0
    assert metrics["top1"] >= REACHES, metrics
    log = _log(demo_run)
    assert [r["epoch"] for r in log] == list(range(1, 9))
    # The exported model is the EMA the trainer evaluated: same weights, same accuracy.
    assert abs(log[-1]["val_top1"] - metrics["top1"]) <= 1 / 297
    assert {"config.yaml", "log.jsonl", "checkpoint.pt", "model.json", "model.safetensors"} <= {
        p.name for p in demo_run.iterdir()
    }
    # The recipe it records is the one it ran: the table's and the data's numbers filled in.
    recorded = yaml.safe_load((demo_run / "config.yaml").read_text())
    assert None not in recorded.values()
    assert (recorded["dropout"], recorded["image_size"], recorded["randaugment_magnitude"]) == (
        0.25,
        32,
        10,
    )
    assert (recorded["num_classes"], recorded["epoch_samples"]) == (10, 1000)


def test_torchrun_two_processes_reach_75_percent(digits1000: Path, tmp_path: Path):
    """Two ranks of 32 make the same global batch of 64 as one process of 64."""
    out = tmp_path / "ddp"
    _run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *_train_cmd(digits1000, out)])
    metrics = _pipeline_eval(out, digits1000)
    assert metrics["top1"] >= REACHES, metrics
    log = _log(out)
    assert [r["epoch"] for r in log] == list(range(1, 9))
    assert log[-1]["val_samples"] == 297  # both ranks' halves of the val shards, summed


def test_sigkill_then_resume_continues_and_matches_the_uninterrupted_run(
    demo_run: Path, digits1000: Path, tmp_path: Path
):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *_train_cmd(digits1000, out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its loader workers share its process group
    )
    deadline = time.monotonic() + 180
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    done = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    before = [r for r in _log(out) if r["epoch"] <= done]  # the log may be one epoch ahead
    assert 1 <= done < 8 and [r["epoch"] for r in before] == list(range(1, done + 1))
    assert not (out / "model.json").exists()

    resumed = _run([sys.executable, *_train_cmd(digits1000, out), "--resume"])
    assert f"after epoch {done} of 8" in resumed.stdout
    epochs_run = [line.split(",")[0] for line in resumed.stdout.splitlines() if "val top-1" in line]
    assert epochs_run == [f"epoch {e}" for e in range(done + 1, 9)]
    log = _log(out)
    assert [r["epoch"] for r in log] == list(range(1, 9))
    assert log[:done] == before

    # Data, noise, optimizer, schedule and EMA all restored: the same model, bit for bit.
    reference, result = _log(demo_run), log
    for mine, theirs in zip(result, reference, strict=True):
        assert mine["loss"] == theirs["loss"] and mine["val_top1"] == theirs["val_top1"]
    ours, theirs = load_file(out / "model.safetensors"), load_file(demo_run / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# --- pseudo-labeled shards ---------------------------------------------------------------


def _pseudo_shards(unlabeled: Path, out: Path, per_shard: int = 400) -> None:
    """Training shards in `pipeline filter`'s format (header, image + .cls + .pl), with the
    digits' true classes as soft labels: 0.8 on the class, 0.2 on its neighbour."""
    targets = load_digits().target
    samples = list(iter_samples(expand_shards(str(unlabeled)), print))
    records = []
    for sample in samples:
        cls = int(targets[int(sample["__key__"].removeprefix("digit"))])
        label = PseudoLabel(
            key=sample["__key__"],
            indices=np.array([cls, (cls + 1) % 10]),
            probs=np.array([0.8, 0.2], np.float16),
            confidence=0.8,
            entropy=0.5,
            content_hash=content_hash(sample["png"]),
        )
        records.append(
            {
                "__key__": sample["__key__"],
                "png": sample["png"],
                "cls": str(cls).encode(),
                PSEUDO_EXT: encode_pseudo(label),
            }
        )
    for k in range(0, len(records), per_shard):
        shard = [shard_header(teacher="truth", index=k), *records[k : k + per_shard]]
        write_shard(str(out / f"train-{k // per_shard:06d}.tar"), shard)


def test_pseudo_labeled_shards_train_in_the_same_step(tmp_path: Path):
    from rs_pseudolabel.students.train import train

    data = tmp_path / "digits"
    write_digits(str(data), labeled=200, seed=0)
    _pseudo_shards(data / "unlabeled", tmp_path / "pseudo")

    result = train(
        model="rs-mini",
        labeled=str(data / "labeled"),
        pseudo=str(tmp_path / "pseudo"),
        val=str(data / "val"),
        out=str(tmp_path / "student"),
        config=DEMO,
        epochs=6,
        batch_size=16,  # 12 steps of 16 labeled + 48 pseudo-labeled digits per epoch
    )
    log = _log(tmp_path / "student")
    assert len(log) == 6 and result == log[-1]
    assert all(r["loss_pseudo"] > 0 for r in log)
    assert log[-1]["loss_pseudo"] < log[0]["loss_pseudo"]
    # Over seeds 0 to 3 these 72 steps reach 62% to 77%, and the same steps on the 200
    # labeled digits alone 39% to 52%: the bound sits between, 5 points from each.
    assert result["val_top1"] >= 0.57, log


def test_micro_batches_keep_the_step_count_and_schedule_and_are_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    from rs_pseudolabel.students.train import train

    data = tmp_path / "digits"
    write_digits(str(data), labeled=200, seed=0)
    _pseudo_shards(data / "unlabeled", tmp_path / "pseudo")
    logs = {}
    for micro in (0, 16, 1):
        out = tmp_path / f"micro{micro}"
        train(
            model="rs-mini",
            labeled=str(data / "labeled"),
            pseudo=str(tmp_path / "pseudo"),
            out=str(out),
            config=DEMO,
            epochs=2,
            batch_size=16,  # 16 labeled + 48 pseudo-labeled: four micro-batches of 16
            overrides=[f"micro_batch={micro}"],
        )
        logs[micro] = _log(out)
        assert yaml.safe_load((out / "config.yaml").read_text())["micro_batch"] == micro
    said = [line for line in capsys.readouterr().out.splitlines() if "micro-batch" in line]
    assert said == [
        "16 labeled + 48 pseudo-labeled images per step per process, in 1 micro-batch of about "
        "64 (micro_batch 0)",
        "16 labeled + 48 pseudo-labeled images per step per process, in 4 micro-batches of "
        "about 16 (micro_batch 16)",
        # A part smaller than 4 would lack a labeled image: asked for 1, it says why not.
        "16 labeled + 48 pseudo-labeled images per step per process, in 16 micro-batches of "
        "about 4 (micro_batch 1: each holds at least one image of each kind, so no fewer)",
    ]
    for whole, split in zip(logs[0], logs[16], strict=True):
        assert (whole["step"], whole["lr"]) == (split["step"], split["lr"])
        # Batch statistics come from 16 images instead of 64: close, not equal.
        assert abs(whole["loss"] - split["loss"]) < 0.25 * whole["loss"]


# --- distributed data and weights --------------------------------------------------------


def _url_and_key(sample: dict) -> tuple[str, str] | None:
    return None if sample["__key__"] == "__shard__" else (sample["__url__"], sample["__key__"])


def test_ranks_read_disjoint_shards(tmp_path: Path):
    from rs_pseudolabel.students.data import node_shards, train_loader

    write_digits(str(tmp_path), labeled=1000, seed=0, shard_size=100)
    urls = expand_shards(str(tmp_path / "labeled"))
    assert len(urls) == 10
    for epoch in (0, 1):
        seen = {}
        for rank in (0, 1):
            loader = train_loader(
                urls,
                _url_and_key,
                10,
                rank=rank,
                world=2,
                first_epoch=epoch,
                seed=0,
                workers=2,
                shuffle_buffer=20,
            )
            batches = [batch for _, batch in zip(range(30), loader, strict=False)]
            seen[rank] = {url for shard_urls, _, _ in batches for url in shard_urls}
        assert len(seen[0]) > 1 and len(seen[1]) > 1 and not seen[0] & seen[1]
    split = [set(node_shards(urls, rank, 2, seed=7)) for rank in (0, 1)]
    assert not split[0] & split[1] and split[0] | split[1] == set(urls)
    # Fewer shards than ranks: no disjoint split exists, every rank reads them all.
    assert node_shards(urls[:1], 1, 2, seed=7) == urls[:1]


def _rendezvous_store():
    """The ranks' meeting point, as torchrun's agent hosts it: a store in this process on a
    port the system picks (one chosen ahead could be taken before rank 0 binds it); the
    ranks, told so by TORCHELASTIC_USE_AGENT_STORE, only connect to it."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _ddp_steps(rank: int, world: int, port: int, labeled: str, out: str) -> None:
    """A rank of a 2-process gloo job: the trainer's own steps (inputs, plan, model and
    optimizer, loaders) and a few DDP steps, then its weights to a file."""
    from dataclasses import replace

    from torch.nn.parallel import DistributedDataParallel

    from rs_pseudolabel.data.device import DeviceFeed, Normalizer
    from rs_pseudolabel.students import distributed, seeding
    from rs_pseudolabel.students.config import TrainArgs, resolve_recipe
    from rs_pseudolabel.students.train import (
        build_loaders,
        build_model,
        mixed_parts,
        plan_steps,
        read_inputs,
        train_one_epoch,
    )
    from rs_pseudolabel.teachers import get_config

    torch.set_num_threads(1)
    os.environ |= {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
    }
    env = distributed.init_distributed("cpu")
    args = TrainArgs(labeled=labeled, out=out)
    quick = ["batch_size=32", "epoch_samples=128", "workers=0", "shuffle_buffer=50"]
    recipe = resolve_recipe(DEMO, quick)
    inputs = read_inputs(args, recipe)
    recipe = replace(recipe, num_classes=10, epoch_samples=inputs.epoch_samples)
    plan = plan_steps(recipe, env, inputs)  # 16 labeled images a step on each rank
    built = build_model(args, recipe, env, "rs-mini")
    initial_fc = built.model.fc.weight.detach().clone()
    table, feed = get_config("rs-mini"), DeviceFeed(env.device)
    loader, _ = build_loaders(recipe, env, inputs, plan, table, feed, start_epoch=0)
    ddp = DistributedDataParallel(built.model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(built.optimizer, lambda step: 1.0)
    seeding.seed_everything(0, 0, rank)  # each rank its own dropout and augmentation
    labels_seen = []

    def batches():
        for batch in mixed_parts(loader, None):
            labels_seen.append(batch[1])
            yield batch

    normal = Normalizer(table.mean, table.std, env.device)
    train_one_epoch(
        ddp, built.optimizer, scheduler, built.ema, batches(), plan.steps_per_epoch,
        plan.splits, recipe, normal,
    )  # fmt: skip
    model, ema = built.model, built.ema
    torch.save(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "labels": torch.cat(labels_seen),
            "initial_fc": initial_fc,
        },
        Path(out) / f"rank{rank}.pt",
    )
    distributed.close_distributed()


def _micro_batch_update(rank: int, world: int, store: str, out: str) -> None:
    """`world` gloo ranks (or one process, world 1) take two optimizer steps over the same 32
    images cut into micro-batches of 4 (each rank its own 16: 4 micro-batches, the gradient
    all-reduced on the last only), through the trainer's own train_step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rs_pseudolabel.data.device import Normalizer
    from rs_pseudolabel.students.config import resolve_recipe
    from rs_pseudolabel.students.train import micro_splits, param_groups, train_step

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("rs-mini", 10, drop_rate=0.0, drop_path_rate=0.0)  # no noise to draw
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 32, 32, 32, 3), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (2, 32), generator=gen)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        trained = DistributedDataParallel(model)
    else:
        trained = model
    mine = slice(rank * 32 // world, (rank + 1) * 32 // world)
    splits = micro_splits(32 // world, 0, 4)
    optimizer = torch.optim.SGD(param_groups(model, 4e-5), lr=0.5, momentum=0.9)
    normal = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    recipe = resolve_recipe(DEMO)
    model.train()
    for step in range(2):
        x, y = images[step][mine], labels[step][mine]
        parts = [(x[lab], y[lab], None, None) for lab, _ in splits]
        train_step(trained, optimizer, parts, splits, recipe, normal)
    torch.save(
        {k: v for k, v in model.named_parameters()}, Path(out) / f"world{world}-rank{rank}.pt"
    )
    if world > 1:
        dist.destroy_process_group()


def test_ddp_with_micro_batches_gives_the_one_process_update(tmp_path: Path):
    """DDP synchronises only the last micro-batch of a step (no_sync before it): two gloo
    ranks with 4 micro-batches each must update the weights as one process does with all 8
    (the same micro-batches, so the same batch-norm statistics), to float rounding."""
    mp.start_processes(
        _micro_batch_update, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
        start_method="fork",
    )  # fmt: skip
    _micro_batch_update(0, 1, "", str(tmp_path))
    single = torch.load(tmp_path / "world1-rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"world2-rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.manual_seed(0)
    initial = dict(create_model("rs-mini", 10).named_parameters())
    assert any(not torch.equal(single[k], initial[k]) for k in single)  # it trained
    for rank in ranks:
        worst = max((rank[k] - single[k]).abs().max().item() for k in single)
        assert worst <= 1e-5, worst  # measured 1.3e-6 here (lr 0.5, two steps)


def test_ddp_ranks_keep_identical_weights(digits1000: Path, tmp_path: Path):
    store = _rendezvous_store()
    mp.start_processes(
        _ddp_steps,
        args=(2, store.port, str(digits1000 / "labeled"), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["labels"], ranks[1]["labels"])  # different data
    for part in ("model", "ema"):
        first, second = ranks[0][part], ranks[1][part]
        assert all(torch.equal(first[k], second[k]) for k in first), part
    assert not torch.equal(ranks[0]["model"]["fc.weight"], ranks[0]["initial_fc"])  # it trained


# --- recipe mistakes ---------------------------------------------------------------------


def test_an_existing_run_is_not_overwritten_without_resume(demo_run: Path, digits1000: Path):
    from rs_pseudolabel.students.train import train

    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        train(model="rs-mini", labeled=str(digits1000 / "labeled"), out=str(demo_run), config=DEMO)


def test_a_checkpoint_from_before_the_averaged_model_ema_is_refused_in_one_line(
    digits1000: Path, tmp_path: Path
):
    from rs_pseudolabel.students.train import train
    from rs_pseudolabel.teachers import create_model

    state = create_model("rs-mini", 10).state_dict()
    run = tmp_path / "run"
    run.mkdir()
    old = {"model": state, "ema": state, "epoch": 1, "model_name": "rs-mini", "num_classes": 10}
    torch.save(old, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="earlier version of the trainer") as error:
        train(labeled=str(digits1000 / "labeled"), out=str(run), config=DEMO, resume=True)
    assert "\n" not in str(error.value)


def test_shards_without_images_are_refused_before_training(digits1000: Path, tmp_path: Path):
    from rs_pseudolabel.students.train import train

    write_shard(str(tmp_path / "empty" / "e-000000.tar"), [{"__key__": "a", "cls": b"1"}])
    args = dict(model="rs-mini", out=str(tmp_path / "run"), config=DEMO)
    with pytest.raises(ValueError, match="no image samples in the labeled shards"):
        train(labeled=str(tmp_path / "empty"), overrides=["num_classes=10"], **args)
    with pytest.raises(ValueError, match="no image samples in the pseudo-labeled shards"):
        train(labeled=str(digits1000 / "labeled"), pseudo=str(tmp_path / "empty"), **args)


def test_unknown_set_key_is_a_value_error_naming_it(digits1000: Path, tmp_path: Path):
    from rs_pseudolabel.students.train import train

    with pytest.raises(ValueError, match="'learning_rate'"):
        train(
            model="rs-mini",
            labeled=str(digits1000 / "labeled"),
            out=str(tmp_path / "run"),
            config=DEMO,
            overrides=["learning_rate=0.1"],
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model", "rs-mini", "--set", "nope=1"], "unknown config key 'nope' in --set"),
        (["--model", "rs-7"], "unknown model 'rs-7'"),
        (["--model", "rs-mini", "--set", "flip"], "--set expects key=value"),
        (["--model", "rs-mini", "--set", "epochs=many"], "'epochs' must be a whole number"),
        (["--model", "rs-mini", "--config", "no-such.yaml"], "config file not found"),
        ([], "no model"),
    ],
)
def test_cli_reports_bad_input_in_one_line_with_status_2(
    digits1000: Path, tmp_path: Path, capsys, extra: list[str], expected: str
):
    from rs_pseudolabel.pipeline.cli import main

    argv = ["--labeled", str(digits1000 / "labeled"), "--out", str(tmp_path / "run"), *extra]
    assert main(["train-student", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


def test_missing_shards_name_the_argument(tmp_path: Path, capsys):
    from rs_pseudolabel.pipeline.cli import main

    argv = ["--model", "rs-mini", "--labeled", str(tmp_path / "none"), "--out", str(tmp_path)]
    assert main(["train-student", *argv]) == 2
    assert "labeled shards: shard not found" in capsys.readouterr().err


def test_a_rank_that_fails_ends_the_torchrun_job_with_its_error(tmp_path: Path):
    """Rank 1 draws a shard whose samples have no class: it stops with one error line, and
    the whole job ends in seconds instead of rank 0 waiting in an all-reduce for ever."""
    data = tmp_path / "data"
    write_digits(str(data), labeled=200, seed=0, shard_size=300)
    blank = next(iter_samples(expand_shards(str(data / "unlabeled")), lambda d: None))["png"]
    write_shard(
        str(data / "labeled" / "labeled-000001.tar"),
        [{"__key__": f"nocls{i:05d}", "png": blank} for i in range(1100)],
    )
    started = time.monotonic()
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2"]
        + _train_cmd(data, tmp_path / "run", "--epochs", "1", "--batch-size", "16")
        + ["--set", "epoch_samples=640", "--set", "workers=0", "--set", "shuffle_buffer=50"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        # Unbuffered, as under many schedulers: print's text and its newline are two writes,
        # so a line not written whole could take in the other rank's progress line.
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 180  # not gloo's 30-minute wait in an all-reduce
    # Rank 0 only followed: it says so if its collective fails before torchrun stops it.
    assert "internal error" not in result.stderr, result.stderr
    followed = [line for line in result.stderr.splitlines() if "train-student: stopped:" in line]
    assert all("rank 0 stopped: another rank of this job failed first" in f for f in followed)
    lines = result.stderr.splitlines()
    said = (
        "pipeline train-student: error: 1000 samples in a row could not be used, the last for "
        f"no_class in {data / 'labeled' / 'labeled-000001.tar'}: are these the right shards?"
    )
    assert [line for line in lines if line.startswith("pipeline train-student: error:")] == [said]
    ours = [i for i, line in enumerate(lines) if line.startswith("pipeline train-student:")]
    assert len(ours) <= 2  # the failing rank's line, and rank 0's that it followed
    # torchrun's report comes after them and names the failing rank's line as its root
    # cause (the error file torchrun gave the rank), not a link to torch's documentation.
    root = lines.index("Root Cause (first observed failure):")
    assert max(ours) < root
    assert f"  traceback : {said}" in lines[root:], "\n".join(lines[root:])


def test_a_compiled_run_trains_and_resumes_uncompiled_with_the_same_names(tmp_path: Path):
    """`compile=true` goes through torch.compile (inductor on the CPU here) in place: the
    checkpoint keeps the model's own parameter names, so the run resumes without it; each
    epoch's log gives the share of time spent waiting for data."""
    data = tmp_path / "data"
    write_digits(str(data), labeled=200, seed=0, shard_size=100)
    run = tmp_path / "run"
    quick = ["--set", "epoch_samples=128", "--set", "workers=2", "--batch-size", "32"]
    _run([sys.executable, *_train_cmd(data, run, "--epochs", "1", "--set", "compile=true", *quick)])
    assert yaml.safe_load((run / "config.yaml").read_text())["compile"] is True
    names = set(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    assert names == set(create_model("rs-mini", 10).state_dict())
    _run([sys.executable, *_train_cmd(data, run, "--epochs", "2", "--resume", *quick)])
    log = _log(run)
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(0 <= r["data_wait"] < 1 for r in log), log


_FAIL_ON_RANK_0 = """
import os, sys
from rs_pseudolabel.pipeline.cli import main
from rs_pseudolabel.students import train
real = train.train_step
def train_step(*args, **kwargs):
    if os.environ["RANK"] == "0":
        raise RuntimeError("an unexpected failure on rank 0")
    return real(*args, **kwargs)
train.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_error_on_one_rank_ends_the_torchrun_job_with_it(tmp_path: Path):
    """Not a user mistake but a bug: rank 0 raises in its first step, with loader workers
    running, while rank 1 waits for it in the gradient all-reduce; the job ends in seconds
    with rank 0's traceback, not when a collective times out half an hour later."""
    data = tmp_path / "data"
    write_digits(str(data), labeled=200, seed=0, shard_size=100)
    script = tmp_path / "fail_on_rank_0.py"
    script.write_text(_FAIL_ON_RANK_0)
    started = time.monotonic()
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script)]
        + _train_cmd(data, tmp_path / "run", "--epochs", "2")[2:]
        + ["--set", "workers=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 60, result.stderr[-3000:]
    assert "RuntimeError: an unexpected failure on rank 0" in result.stderr


_STEP_PEAK = f"""
import resource, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from rs_pseudolabel.students.config import Recipe
from rs_pseudolabel.students.train import train_step
from tests.batches import split_batch
from rs_pseudolabel.teachers import create_model
from rs_pseudolabel.data.device import Normalizer
torch.manual_seed(0)
model = create_model("rs-50", num_classes=100).train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
gen = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (64, 128, 128, 3), generator=gen, dtype=torch.uint8)
batch = (images, torch.randint(0, 100, (64,)), None, None)
normal = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
parts, splits = split_batch(batch, int(sys.argv[1]))
train_step(model, optimizer, parts, splits, Recipe(model="rs-50"), normal)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_micro_batches_cut_the_peak_memory_of_a_step():
    """One rs-50 step at 128 px on 64 images, whole and in micro-batches of 8, each in a
    process of its own: the peak grows by the activations the backward pass keeps."""
    grown = {}
    for micro in (0, 8):
        result = subprocess.run(
            [sys.executable, "-c", _STEP_PEAK, str(micro)],
            capture_output=True, text=True, check=True, timeout=600,
        )  # fmt: skip
        grown[micro] = int(result.stdout.split()[-1])
    assert grown[8] <= 0.6 * grown[0], grown

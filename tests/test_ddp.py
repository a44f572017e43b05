"""Training under torchrun (DDP, gloo on the CPU): two ranks reach the accuracy of one
process, read disjoint shards, keep identical weights and give the one-process update with
micro-batches; a rank that fails, by a user's mistake or a bug, ends the whole job in
seconds with its own line."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.fixtures import write_shard
from rs_pseudolabel.data.digits import write_digits
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.teachers import create_model
from tests.trainer import (
    DIGITS_RECIPE,
    REACHES,
    ROOT,
    TORCHRUN,
    pipeline_eval,
    read_log,
    run_ok,
    train_cmd,
)


def test_torchrun_two_processes_reach_75_percent(digits1000: Path, tmp_path: Path):
    """Two ranks of 32 make the same global batch of 64 as one process of 64."""
    out = tmp_path / "ddp"
    run_ok([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *train_cmd(digits1000, out)])
    metrics = pipeline_eval(out, digits1000)
    assert metrics["top1"] >= REACHES, metrics
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(1, 9))
    assert log[-1]["val_samples"] == 297  # both ranks' halves of the val shards, summed


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
        Run,
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
    recipe = resolve_recipe(DIGITS_RECIPE, quick)
    inputs = read_inputs(args, recipe)
    recipe = replace(recipe, num_classes=10, epoch_samples=inputs.epoch_samples)
    table, feed = get_config("rs-mini"), DeviceFeed(env.device)
    run = Run(args, recipe, env, inputs, table)
    plan = plan_steps(run)  # 16 labeled images a step on each rank
    built = build_model(run)
    initial_fc = built.model.fc.weight.detach().clone()
    loader, _ = build_loaders(run, plan, feed, start_epoch=0)
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
    recipe = resolve_recipe(DIGITS_RECIPE)
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
        + train_cmd(data, tmp_path / "run", "--epochs", "1", "--batch-size", "16")
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


def test_an_unexpected_error_on_one_rank_ends_the_torchrun_job_with_it(tmp_path: Path):
    """Not a user mistake but a bug: rank 0 raises in its first step, with loader workers
    running, while rank 1 waits for it in the gradient all-reduce; the job ends in seconds
    with rank 0's traceback, not when a collective times out half an hour later."""
    data = tmp_path / "data"
    write_digits(str(data), labeled=200, seed=0, shard_size=100)
    script = ROOT / "tests" / "programs" / "fail_on_rank_0.py"
    started = time.monotonic()
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script)]
        + train_cmd(data, tmp_path / "run", "--epochs", "2")[2:]
        + ["--set", "workers=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 60, result.stderr[-3000:]
    assert "RuntimeError: an unexpected failure on rank 0" in result.stderr

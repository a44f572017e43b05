"""Where a training process sits among torchrun's processes, and the few collectives the
trainer makes: one process without torchrun, gloo on CPUs, NCCL on GPUs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rs_pseudolabel.data.device import resolve_device
from rs_pseudolabel.data.errors import USER_ERRORS, UsageError, in_words


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: rank and world size, and the device it trains on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (nccl on GPUs,
    gloo on CPUs); without those variables, a single process."""
    device = resolve_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed(0, 1, 0, torch.device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            device_id=target if target.type == "cuda" else None,
        )
    return Distributed(rank, world, local_rank, target)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(*modules: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank. DDP syncs parameters each step
    but buffers only at the start of a forward, so after the last step each rank holds the
    statistics of its own batch; syncing at the end of an epoch makes ranks identical again."""
    if not dist.is_initialized():
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_object(value: object, env: Distributed) -> object:
    """Rank 0's `value` on every rank (for what only rank 0 computes, e.g. a sample count)."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(env: Distributed, work: Callable[[], object]) -> object:
    """`work()` on rank 0, its result (or the user error it raised) on every rank: no rank
    is left waiting in a collective for a rank that stopped with an error."""
    result, error = None, None
    if env.is_main:
        try:
            result = work()
        except USER_ERRORS as exc:
            error = in_words(exc)
    result, error = broadcast_object((result, error), env)
    if error is not None:
        raise UsageError(error)
    return result


def peer_lost(exc: RuntimeError) -> bool:
    """Whether a collective failed because another rank went away (gloo and NCCL raise a
    plain RuntimeError naming the closed connection), not for a fault of this rank."""
    text = str(exc)
    return isinstance(exc, dist.DistNetworkError) or any(
        cue in text for cue in ("closed by peer", "reset by peer", "remote worker", "Broken pipe")
    )


def gather_objects(value: object, env: Distributed) -> list[object]:
    """Every rank's `value`, on every rank (small things: a rank's drop counts)."""
    if not env.enabled:
        return [value]
    found: list[object] = [None] * env.world
    dist.all_gather_object(found, value)
    return found

"""The trainer's plumbing: distributed set-up, seeding, the run log and atomic checkpoints.

A run directory may be local or any fsspec URL; every file in it is written whole under a
temporary name and renamed (`data.storage.write_bytes`), so a run killed at any moment leaves
the previous checkpoint and log intact.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import yaml
from webdataset.utils import make_seed

from data.errors import USER_ERRORS, UsageError
from data.manifest import DONE, MANIFEST, RUNNING, check_apart, difference, read_manifest
from data.storage import (
    exists,
    join,
    open_read,
    read_bytes,
    read_json,
    remove,
    remove_temporaries,
    walk_files,
    write_bytes,
    write_json,
)
from teachers.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE
from teachers.inference import resolve_device
from teachers.weights import unpickler_reason


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
            error = str(exc)
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


def seed_everything(*parts: int) -> None:
    """Seed torch, Python and NumPy from (seed, epoch, rank): the noise of an epoch (dropout,
    stochastic depth, main-process augmentation, whose RandAugment draws its ops from NumPy)
    depends on where it is, not on what ran before, so a resumed run draws what the
    uninterrupted one drew."""
    seed = make_seed(*parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- the run directory -------------------------------------------------------------------


def save_checkpoint(run_dir: str, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(join(run_dir, CHECKPOINT_FILE), buffer.getbuffer())


def load_checkpoint(run_dir: str) -> dict | None:
    """The run's checkpoint (tensors and plain values only: loaded with weights_only=True),
    or None when the run has none yet."""
    url = join(run_dir, CHECKPOINT_FILE)
    if not exists(url):
        return None
    with open_read(url) as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UsageError(
                f"{url} was refused by torch's weights-only loader ({unpickler_reason(exc)}): "
                "a checkpoint holds only tensors and plain values, and anything else could run "
                "code. Start a new run with another --out"
            ) from exc
        except (RuntimeError, EOFError) as exc:
            raise UsageError(f"{url} is not a readable training checkpoint: {exc}") from exc


def has_checkpoint(run_dir: str) -> bool:
    return exists(join(run_dir, CHECKPOINT_FILE))


def write_config(run_dir: str, config: dict) -> None:
    write_bytes(join(run_dir, CONFIG_FILE), yaml.safe_dump(config, sort_keys=False).encode())


def read_log(run_dir: str) -> list[dict]:
    url = join(run_dir, LOG_FILE)
    if not exists(url):
        return []
    text = read_bytes(url).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_log(run_dir: str, records: list[dict]) -> None:
    """The whole log, rewritten atomically each epoch: small, and valid after any kill."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_bytes(join(run_dir, LOG_FILE), text.encode())


# --- the run directory's claim -----------------------------------------------------------

# The recipe keys --resume may change: a longer run, and compiling (how, not what, it runs).
MID_RUN_CHANGES = ("epochs", "compile")
# Who trains into a run directory: rewritten every BEAT_SECONDS while the run lives, removed
# when it ends. A claim from another machine whose beat is older than STALE_SECONDS is taken
# for a run that was killed (SIGKILL, SIGTERM: no handler, which a rank blocked in a
# collective would not run); one from this machine counts while its process lives.
CLAIM_FILE = "_claim.json"
BEAT_SECONDS = 30.0
STALE_SECONDS = 120.0
# The run directories this process claimed: the event that stops each one's heartbeat, and
# the thread that beats.
_held: dict[str, tuple[threading.Event, threading.Thread]] = {}


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks (None if there is none): a pid the
    system reused for another process does not hold a claim."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    """This boot of this machine: two machines of one host name, or one rebooted, differ."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": pid,
        "start": _process_start(pid),
    }


def live_claim(out: str) -> str | None:
    """Who else is training into `out` now, in words, or None."""
    try:
        claim = read_json(join(out, CLAIM_FILE))
    except (OSError, ValueError):
        return None
    if not isinstance(claim, dict):
        return None
    me = _me()
    who = f"pid {claim.get('pid')} on {claim.get('host')}"
    pid = claim.get("pid")
    same_boot = (claim.get("host"), claim.get("boot")) == (me["host"], me["boot"])
    if same_boot and me["start"] is not None and isinstance(pid, int):  # its process decides
        if pid == me["pid"]:
            return None
        return who if _process_start(pid) == claim.get("start") else None
    try:  # another machine (or no /proc to ask): the heartbeat decides
        age = time.time() - float(claim.get("beat", 0))
    except (TypeError, ValueError):
        return None
    return f"{who}, last seen {age:.0f} s ago" if age < STALE_SECONDS else None


def _hold(out: str) -> None:
    """Write this process's claim on `out` and keep it fresh until `release_claims`."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_SECONDS):
            try:
                write_json(join(out, CLAIM_FILE), {**_me(), "beat": time.time()})
            except OSError:  # a storage hiccup: the next beat tries again
                pass

    write_json(join(out, CLAIM_FILE), {**_me(), "beat": time.time()})
    thread = threading.Thread(target=beat, name="run-claim", daemon=True)
    thread.start()
    _held[out] = (stop, thread)


def release_claims() -> None:
    """End this process's claims: the run finished or stopped."""
    for out, (stop, thread) in list(_held.items()):
        stop.set()
        thread.join()  # no beat may write the claim again once it is removed
        try:
            remove(join(out, CLAIM_FILE))
        except OSError:  # left behind, it goes stale by itself
            pass
        del _held[out]


def claim_run(
    out: str, fingerprint: dict, inputs: list[str], resume: bool, overwrite: bool
) -> bool:
    """Make `out` this run's directory, or refuse in one line: a new folder; the same run
    continued with --resume (same recipe and inputs; only a longer `epochs` may change, and
    then takes effect); or, with --overwrite, a folder cleared for a fresh run. True when
    `out` already holds this very run, finished: there is nothing left to do."""
    check_apart(out, inputs)
    holder = live_claim(out)
    if holder is not None:
        raise UsageError(
            f"another trainer ({holder}) is writing {out}: wait for it to end or stop it "
            f"(a claim from a machine that died expires {STALE_SECONDS:.0f} s after its last "
            f"beat), or choose another --out"
        )
    existing = read_manifest(out)
    if overwrite:
        remove(out)
    elif existing is not None:
        if not resume:
            raise UsageError(
                f"{out} already holds a run: pass --resume to continue it, --overwrite to "
                "start afresh, or choose a new --out"
            )
        old = existing.get("fingerprint", {})
        changed = difference(_fixed(fingerprint), _fixed(old))
        if changed is not None:
            raise UsageError(
                f"{out} holds a run made with other settings: {changed}. --resume continues "
                "the same recipe and inputs (only a larger epochs); --overwrite starts afresh"
            )
        if existing.get("fingerprint") == fingerprint:
            # The same run, resumed: its record stands until the run finishes again.
            if existing.get("state") == DONE:
                return True
            _hold(out)
            return False
    else:
        remove_temporaries(out)
        if has_checkpoint(out):
            raise UsageError(
                f"{out} holds a checkpoint from an earlier version of the trainer, whose "
                "recipe --resume cannot check: start a new run with another --out, or "
                "--overwrite to clear it"
            )
        if walk_files(out):
            raise UsageError(
                f"{out} already holds files that no training run wrote (no manifest.json): "
                "choose a new --out, or --overwrite to clear it"
            )
    write_json(
        join(out, MANIFEST),
        {"stage": "train-student", "state": RUNNING, "fingerprint": fingerprint},
    )
    _hold(out)
    return False


def _fixed(fingerprint: dict) -> dict:
    recipe = {k: v for k, v in fingerprint.get("recipe", {}).items() if k not in MID_RUN_CHANGES}
    return {**fingerprint, "recipe": recipe}


def finish_run(out: str, fingerprint: dict, log: list[dict]) -> None:
    """The run's manifest in state "done": what it trained on, how far, and what its loaders
    dropped, by reason, over all epochs."""
    dropped = sum((Counter(record.get("dropped", {})) for record in log), Counter())
    last = log[-1] if log else {}
    write_json(
        join(out, MANIFEST),
        {
            "stage": "train-student",
            "state": DONE,
            "fingerprint": fingerprint,
            "epochs": last.get("epoch", 0),
            "steps": last.get("step", 0),
            "dropped": sum(dropped.values()),
            "drops": dict(sorted(dropped.items())),
            "final": {k: v for k, v in last.items() if k.startswith(("val_", "loss"))},
        },
    )

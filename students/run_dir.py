"""A training run's directory: its claim, its atomic checkpoint, config and log.

A run directory may be local or any fsspec URL; every file in it is written whole under a
temporary name and renamed (`data.storage.write_bytes`), so a run killed at any moment leaves
the previous checkpoint and log intact. It is claimed like a stage's output folder
(`data.manifest.StageOutput`), with the trainer's own policy: an existing run continues only
with --resume, and only a longer run may change its recipe.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import threading
import time
import uuid
from collections import Counter

import torch
import yaml

from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.manifest import DONE, MANIFEST, StageOutput, difference
from rs_pseudolabel.data.storage import (
    absolute,
    exists,
    join,
    open_read,
    read_bytes,
    read_json,
    remove,
    walk_files,
    write_bytes,
    write_json,
)
from rs_pseudolabel.students.config import Recipe
from rs_pseudolabel.teachers.weights import unpickler_reason

# The trainer's own files in a run directory, beside the exported model (teachers/checkpoint.py)
CHECKPOINT_FILE = "checkpoint.pt"  # weights, EMA, optimizer and epoch, to resume from
LOG_FILE = "log.jsonl"  # a line per finished epoch
CONFIG_FILE = "config.yaml"  # the resolved recipe


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


# The recipe keys --resume may change: a longer run, and how the same steps are computed
# (compiling, the micro-batches a step's gradient is summed over, the validation batch, the
# loader processes), so a run that ran out of memory continues with smaller micro-batches.
MID_RUN_CHANGES = ("epochs", "compile", "micro_batch", "eval_batch_size", "workers")
# Who trains into a run directory: a token of the claiming process, rewritten with a beat
# count every BEAT_SECONDS while the run lives, removed when it ends. Its liveness: on the
# same machine, boot and pid namespace, the process it names (pid and start time) decides at
# once, both ways; anywhere else (another machine, a container sharing the host's name and
# boot but not its pids) the heartbeat decides, watched on this machine's clock alone: a
# claim whose beat count does not move for WATCH_SECONDS is stale. Clocks are never
# compared, so a host whose clock is off is neither taken for dead nor for alive.
CLAIM_FILE = "_claim.json"
BEAT_SECONDS = 30.0
# Kept for claims the watch cannot judge (a claim without a beat count).
STALE_SECONDS = 120.0
# The run directories this process claimed: the event that stops each one's heartbeat, and
# the thread that beats.
_held: dict[str, tuple[threading.Event, threading.Thread]] = {}
_tokens: set[str] = set()


def watch_seconds() -> float:
    """How long a heartbeat may stay still before its claim is taken for stale."""
    return 1.5 * BEAT_SECONDS + 2


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


def _pid_namespace() -> str | None:
    """This process's pid namespace: a pid means the same process only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pidns": _pid_namespace(),
        "pid": pid,
        "start": _process_start(pid),
    }


def _read_claim(out: str) -> dict | None:
    try:
        claim = read_json(join(out, CLAIM_FILE))
    except (OSError, ValueError):
        return None
    return claim if isinstance(claim, dict) else None


def live_claim(out: str) -> str | None:
    """Who else is training into `out` now, in words, or None (no claim, this process's,
    a copy's, or a stale one)."""
    claim = _read_claim(out)
    if claim is None or claim.get("token") in _tokens:
        return None
    if claim.get("dir") not in (None, absolute(out)):  # copied with its folder (cp -r)
        return None
    me = _me()
    who = f"pid {claim.get('pid')} on {claim.get('host')}"
    pid = claim.get("pid")
    here = [claim.get(k) for k in ("host", "boot", "pidns")] == [
        me["host"],
        me["boot"],
        me["pidns"],
    ]
    if here and me["pidns"] and me["start"] is not None and isinstance(pid, int):
        return who if _process_start(pid) == claim.get("start") else None
    return _watched(out, claim, who)


def _watched(out: str, claim: dict, who: str) -> str | None:
    """A claim from elsewhere: live if its beat count moves within `watch_seconds()` of this
    machine's clock, said with the claim's own clock if it is far from this one's."""
    if "beats" not in claim:  # an older release's claim: its beat's age is all there is
        age = time.time() - float(claim.get("beat", 0) or 0)
        return f"{who}, last seen {age:.0f} s ago" if age < STALE_SECONDS else None
    deadline = time.monotonic() + watch_seconds()
    while time.monotonic() < deadline:
        time.sleep(min(1.0, BEAT_SECONDS / 4))
        now = _read_claim(out)
        if now is None or now.get("token") != claim.get("token"):
            return None  # released, or taken over meanwhile: judged afresh by the caller
        if now.get("beats") != claim.get("beats"):
            skew = float(now.get("beat", 0) or 0) - time.time()
            clock = (
                f"; its clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
                "this machine's"
                if abs(skew) > 60
                else ""
            )
            return f"{who}, its heartbeat moving{clock}"
    return None


def _hold(out: str) -> None:
    """Write this process's claim on `out` and keep it fresh until `release_claims`."""
    stop = threading.Event()
    token = uuid.uuid4().hex
    _tokens.add(token)
    record = {**_me(), "token": token, "dir": absolute(out)}

    def write(beats: int) -> None:
        write_json(join(out, CLAIM_FILE), {**record, "beats": beats, "beat": time.time()})

    def beat() -> None:
        beats = 0
        while not stop.wait(BEAT_SECONDS):
            beats += 1
            try:
                write(beats)
            except OSError:  # a storage hiccup: the next beat tries again
                pass

    write(0)
    thread = threading.Thread(target=beat, name="run-claim", daemon=True)
    thread.start()
    _held[out] = (stop, thread)


def release_claims(give_back: bool = False) -> None:
    """End this process's claims: the run finished or stopped. With `give_back` (the run
    was refused for the user's mistake), a run directory that holds no checkpoint yet is
    removed whole, so the corrected command is not refused as another run's folder."""
    for out, (stop, thread) in list(_held.items()):
        stop.set()
        thread.join()  # no beat may write the claim again once it is removed
        try:
            remove(out if give_back and not has_checkpoint(out) else join(out, CLAIM_FILE))
        except OSError:  # left behind, it goes stale by itself
            pass
        del _held[out]


class RunOutput(StageOutput):
    """A run directory claimed like a stage's output, under the trainer's rules: a run there
    is continued only with --resume, and then only `MID_RUN_CHANGES` may differ (the new
    values take effect; epochs only grow); --overwrite clears it, whatever it holds."""

    def __init__(
        self, out: str, fingerprint: dict, inputs: list[str], resume: bool, overwrite: bool
    ) -> None:
        super().__init__(out, "train-student", fingerprint, inputs, overwrite)
        self.fingerprint = fingerprint  # a run's record has never named its stage in it
        self.resume = resume

    def refusal(self, old: dict) -> str | None:
        if self.overwrite:
            return "cleared by --overwrite"
        if not self.resume:
            return (
                f"{self.out_dir} already holds a run: pass --resume to continue it, "
                "--overwrite to start afresh, or choose a new --out"
            )
        planned, asked = old.get("recipe", {}).get("epochs"), self.fingerprint["recipe"]["epochs"]
        if isinstance(planned, int) and asked < planned:
            return (
                f"{self.out_dir} holds a run of {planned} epochs: --resume continues it to as "
                f"many or more, not {asked}; --overwrite starts afresh"
            )
        changed = difference(_fixed(self.fingerprint), _fixed(old))
        if changed is not None:
            return (
                f"{self.out_dir} holds a run made with other settings: {changed}. --resume "
                "continues the same recipe and inputs (epochs may grow, and how the steps are "
                "computed change); --overwrite starts afresh"
            )
        return None

    def check_unclaimed(self) -> None:
        if self.overwrite:
            remove(self.out_dir)
            return
        if has_checkpoint(self.out_dir):
            raise UsageError(
                f"{self.out_dir} holds a checkpoint from an earlier version of the trainer, "
                "whose recipe --resume cannot check: start a new run with another --out, or "
                "--overwrite to clear it"
            )
        if walk_files(self.out_dir):
            raise UsageError(
                f"{self.out_dir} already holds files that no training run wrote (no "
                "manifest.json): choose a new --out, or --overwrite to clear it"
            )


def claim_run(
    out: str, fingerprint: dict, inputs: list[str], resume: bool, overwrite: bool
) -> bool:
    """Make `out` this run's directory, or refuse in one line: a new folder; the same run
    continued with --resume (same recipe and inputs; only a longer `epochs` may change, and
    then takes effect); or, with --overwrite, a folder cleared for a fresh run. True when
    `out` already holds this very run, finished: there is nothing left to do."""
    holder = live_claim(out)
    if holder is not None:
        raise UsageError(
            f"another trainer ({holder}) is writing {out}: wait for it to end or stop it, "
            f"or choose another --out (a claim whose heartbeat stops is taken over after "
            f"{watch_seconds():.0f} s of watching; {join(out, CLAIM_FILE)} may be removed by "
            "hand once that trainer is gone)"
        )
    if RunOutput(out, fingerprint, inputs, resume, overwrite).open() is not None:
        return True
    _hold(out)
    return False


def _fixed(fingerprint: dict) -> dict:
    """What --resume compares: the recipe without the keys it may change, and with a key
    added to the trainer after the run was recorded read as its default (which is what the
    run trained with), so an upgrade does not strand older runs."""
    recipe = {**_RECIPE_DEFAULTS, **fingerprint.get("recipe", {})}
    return {**fingerprint, "recipe": {k: v for k, v in recipe.items() if k not in MID_RUN_CHANGES}}


_RECIPE_DEFAULTS = {k: v for k, v in Recipe().to_dict().items() if v is not None}


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

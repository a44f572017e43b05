"""Where a model runs and how pixels reach it, for the labeler and the trainer alike: the
`--device` resolution, the feed that moves batches onto the device (pinned memory and a side
stream on CUDA, plain calls on the CPU), and the normalisation done there."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

from rs_pseudolabel.data.errors import UsageError


def resolve_device(device: str) -> str:
    """`--device` (auto, cpu, cuda) decided where the model runs (a Beam worker, a training
    process), never on the machine that only launches the job: "auto" is CUDA when this
    process sees a GPU."""
    found = worker_devices(device)
    return found[0].split(":")[0] if device in ("auto", "cuda") else found[0]


def worker_devices(device: str, cuda_devices: int | None = None) -> list[str]:
    """The devices a worker spreads its teachers over: every GPU it sees for `auto` and
    `cuda`, the one named by `cuda:N`, or the CPU. `cuda_devices` defaults to what this
    process sees. The one place `--device` is checked against what the process sees."""
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if device == "auto":
        device = "cuda" if count else "cpu"
    if device == "cuda":
        if not count:
            raise UsageError("--device cuda was asked for, but this worker sees no CUDA device")
        return [f"cuda:{i}" for i in range(count)]
    return [device]


def normalize(
    pixels: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 [N,] H, W, 3 pixels (from `EvalCrop`) -> normalised float [N,] 3, H, W (laid out
    channels-last): the arithmetic of torchvision's to_dtype(scale=True) and normalize, in
    plain torch, because importing torchvision costs every labeling process seconds of
    start-up. Where the pixels are: `mean` and `std` as tensors on their device cost no copy."""
    scaled = pixels.movedim(-1, -3).to(torch.float32, copy=True).mul_(1.0 / 255)
    as_channels = partial(torch.as_tensor, dtype=torch.float32, device=pixels.device)
    return scaled.sub_(as_channels(mean).view(-1, 1, 1)).div_(as_channels(std).view(-1, 1, 1))


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout a model and its inputs take on `device`: channels-last on CUDA (the fast
    path of tensor cores), the default elsewhere."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


class DeviceFeed:
    """How pixels reach the device of a model (a teacher labeling, a student training). On
    CUDA: from pinned memory, on a side stream of the thread that feeds it, each batch marked
    by an event the model's stream waits for. On CPU the same calls are plain (no copy, no
    stream).

    Each thread has a side stream of its own (the threads of a label worker share a teacher
    and its feed): the caching allocator reuses a freed block only for work on the stream it
    was allocated on, so what one thread frees with reads still queued is never handed to
    another thread's work, and `drain` waits for the calling thread's queue alone."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.new_stream = partial(torch.cuda.Stream, device) if self.cuda else None
        self._local = threading.local()
        # Loaders pin their batches where the copy from pinned memory is asynchronous.
        self.pin_memory = self.cuda

    @property
    def stream(self):
        """The calling thread's side stream (None on CPU), made on its first use."""
        if self.new_stream is None:
            return None
        if getattr(self._local, "stream", None) is None:
            self._local.stream = self.new_stream()
        return self._local.stream

    def context(self):
        """Where the input thread's device work runs."""
        return torch.cuda.stream(self.stream) if self.cuda else nullcontext()

    def to_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = torch.as_tensor(pixels)
        if self.cuda and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def mark(self, current: bool = False) -> torch.cuda.Event | None:
        """An event after the work queued so far on the input thread's side stream (with
        `current`, on the calling thread's current stream); None on CPU, where work is done
        when the call returns."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device) if current else self.stream)
        return event

    def drain(self) -> None:
        """Wait until everything queued on the side stream has run (a no-op on CPU): before
        a call that writes memory from a stream of its own without waiting for this one."""
        if self.cuda:
            self.stream.synchronize()

    def release_cached(self) -> None:
        """Hand the allocator's cached blocks back, before retrying what ran out of memory
        (the CPU allocator caches nothing)."""
        if self.cuda:
            torch.cuda.empty_cache()

    @staticmethod
    def accept(pixels: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        """Make the current stream wait for `pixels`, and keep their memory from reuse by the
        side stream until the current stream is done with them."""
        if ready is not None:
            current = torch.cuda.current_stream(pixels.device)
            current.wait_event(ready)
            pixels.record_stream(current)


class Normalizer:
    """uint8 [N, H, W, 3] pixels (anywhere) -> the model's normalised float [N, 3, H, W] on
    `device`, in the device's `memory_format`: what loaders send as uint8 (a quarter of float32's bytes) is made float where
    the model runs, with the mean and std already there."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize(pixels.to(self.device, non_blocking=True), self.mean, self.std)
        return x.contiguous(memory_format=memory_format(self.device))

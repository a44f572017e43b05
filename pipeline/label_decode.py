"""Feeding the teacher: decoding and the eval crop run beside the forward pass, in order.

On CPU the images of each chunk (a batch's worth of samples) go to a pool of decode
processes, a few chunks ahead of the forward pass, and come back in the order they went:
the batches, and so the sidecar's bytes, do not depend on the number of processes. The
pool's processes fork from a fork server that imported only Pillow and numpy, so they
start in a fraction of a second and never inherit a threaded Beam worker's locks. On CUDA,
JPEGs are decoded in batches on the GPU (nvJPEG) and resized and cropped there; any other
format, and any JPEG nvJPEG refuses, goes the CPU way with its drop reasons.
"""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from functools import partial
from multiprocessing.pool import Pool

import torch
from PIL import Image

from data.decode import MAX_PIXELS, EvalCrop, eval_chunk
from data.errors import UsageError

DECODERS = ("auto", "cpu", "gpu")
AHEAD_PER_PROCESS = 2  # chunks queued per decode process: enough to never leave one idle
Chunk = list[tuple[str, bytes]]  # (key, image bytes)
Decoded = list[tuple[str, bytes, "torch.Tensor | None", "str | None"]]  # + HWC uint8, reason

_pools: dict[int, Pool] = {}
_pools_lock = threading.Lock()


def default_processes(asked: int | None = None) -> int:
    """Decode processes for this worker: `asked` (the --decode-processes flag) when given,
    else its cores (what the machine lets this process use)."""
    if asked is not None:
        return asked
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def decode_pool(processes: int) -> Pool:
    """One pool per worker process and size, shared by the threads of a Beam worker."""
    with _pools_lock:
        if processes not in _pools:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["data.decode"])
            pool = context.Pool(processes)
            atexit.register(pool.terminate)  # before the interpreter tears its modules down
            _pools[processes] = pool
        return _pools[processes]


def warm_pool(processes: int) -> None:
    """Start `decode_pool(processes)` on a thread: where the workers are threads of this
    process, the pool (a fork server importing Pillow, then its forks) comes up on another
    core while Beam starts, instead of after it."""
    if processes > 0:
        threading.Thread(target=decode_pool, args=(processes,), daemon=True).start()


class CpuDecoder:
    """Chunks in, decoded chunks out, in order; `processes=0` decodes in this thread."""

    def __init__(self, crop: EvalCrop, processes: int) -> None:
        self.crop, self.processes = crop, processes
        self.pool = decode_pool(processes) if processes > 0 else None

    def __call__(self, chunks: Iterable[Chunk]) -> Iterator[Decoded]:
        work = partial(eval_chunk, self.crop)
        if self.pool is None:
            for chunk in chunks:
                yield _joined(chunk, work([data for _, data in chunk]))
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, self.pool.apply_async(work, ([data for _, data in chunk],))))
            if len(pending) > AHEAD_PER_PROCESS * self.processes:
                done, result = pending.popleft()
                yield _joined(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield _joined(done, result.get())


def _joined(chunk: Chunk, results: list) -> Decoded:
    return [
        (key, data, None if pixels is None else torch.from_numpy(pixels), reason)
        for (key, data), (pixels, reason) in zip(chunk, results, strict=True)
    ]


def _gpu_decodable(data: bytes) -> bool:
    """A JPEG whose header is small enough: the CPU path names everything else's reason."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # undecodable headers are the CPU path's to name
        return False
    return 0 < width * height <= MAX_PIXELS


class GpuDecoder:
    """nvJPEG batches on the device, the eval crop there too; a CPU decoder for the rest."""

    def __init__(self, crop: EvalCrop, device: str, fallback: CpuDecoder) -> None:
        from torchvision.transforms import InterpolationMode

        self.crop, self.device, self.fallback = crop, torch.device(device), fallback
        self.interpolation = InterpolationMode(crop.interpolation)

    def _on_gpu(self, images: list[bytes]) -> list[torch.Tensor] | None:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        try:
            decoded = decode_jpeg(
                [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images],
                mode=ImageReadMode.RGB,
                device=self.device,
            )
        except RuntimeError:  # a JPEG nvJPEG refuses: the whole chunk goes the CPU way
            return None
        size = self.crop.crop
        return [
            F.center_crop(
                F.resize(image, [self.crop.resize], self.interpolation, antialias=True),
                [size, size],
            ).permute(1, 2, 0)
            for image in decoded
        ]

    def __call__(self, chunks: Iterable[Chunk]) -> Iterator[Decoded]:
        for chunk in chunks:
            fast = [i for i, (_, data) in enumerate(chunk) if _gpu_decodable(data)]
            pixels = self._on_gpu([chunk[i][1] for i in fast]) if fast else None
            by_index = dict(zip(fast, pixels, strict=True)) if pixels is not None else {}
            rest = [item for i, item in enumerate(chunk) if i not in by_index]
            slow = iter(next(self.fallback([rest])) if rest else [])
            out = []
            for i, (key, data) in enumerate(chunk):
                out.append((key, data, by_index[i], None) if i in by_index else next(slow))
            yield out


def make_decoder(crop: EvalCrop, mode: str, device: str, processes: int):
    """The decoder a worker feeds its teacher with: `auto` is the GPU's on CUDA."""
    if mode not in DECODERS:
        raise UsageError(f"--decode must be one of {', '.join(DECODERS)}, got {mode!r}")
    cpu = CpuDecoder(crop, processes)
    on_cuda = torch.device(device).type == "cuda"
    if mode == "gpu" and not on_cuda:
        raise UsageError("--decode gpu needs the teacher on a CUDA device")
    if mode == "gpu" or (mode == "auto" and on_cuda):
        return GpuDecoder(crop, device, cpu)
    return cpu

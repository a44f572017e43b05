"""Feeding the teacher: reading, hashing, decoding and the eval crop run beside the forward
pass, in order, and hand the forward pass uint8 batches already on its device.

Two decoders, one contract (chunks of `(key, image bytes, content hash)` in, `Decoded`
chunks out, in order):
- `CpuDecoder`: each chunk goes to a pool of decode processes, a few chunks ahead; the pool's
  processes fork from a fork server that imported only Pillow and numpy, so they start in a
  fraction of a second and never inherit a threaded Beam worker's locks.
- `DeviceDecoder`: JPEGs are decoded in batches by `torchvision.io.decode_jpeg` on the
  teacher's device (nvJPEG on CUDA, libjpeg-turbo on CPU: the same code either way) and
  resized and cropped there; every image it does not take (another format, a CMYK JPEG, one
  too large, one it refuses) goes to the CPU pool on its own, with the pool's read-ahead,
  and meets the others on the device.
Batches are cut at fixed positions of the decodable samples, so the sidecar's bytes do not
depend on the number of processes. On CUDA the pixels travel as uint8 from pinned memory on
a side stream, so the copy overlaps the forward pass of the batch before.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.pool import Pool

import numpy as np
import torch

from rs_pseudolabel.data.decode import (
    DECODERS,
    JPEG_START,
    MAX_PIXELS,
    EvalCrop,
    eval_stack,
    jpeg_header,
)
from rs_pseudolabel.data.device import DeviceFeed
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.progress import say
from rs_pseudolabel.data.records import content_hash

AHEAD_PER_PROCESS = 2  # chunks queued per decode process: enough to never leave one idle
AHEAD_CHUNKS = 2  # chunks whose CPU share is queued while the device decodes the one before
HASH_SLICES = 4  # a chunk's content hashes, in this many tasks of the hashing threads
Item = tuple[str, bytes, bytes]  # key, image bytes, content hash

_pools: dict[int, Pool] = {}
_pools_lock = threading.Lock()
_hashers: list[ThreadPoolExecutor] = []


def default_processes(asked: int | None = None) -> int:
    """Decode processes for this worker: `asked` (the --decode-processes flag) when given,
    else its cores (what the machine lets this process use)."""
    if asked is not None:
        return asked
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextmanager
def _main_unnamed() -> Iterator[None]:
    """Start processes that do not import the caller's main module. multiprocessing has its
    fork server and its children import `__main__` by path or name, which runs a user's
    script again; one that calls `label.run` without `if __name__ == "__main__":` would
    start pools without end. The decode processes need only `data.decode`."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__


def decode_pool(processes: int) -> Pool:
    """One pool per worker process and size, shared by the threads of a Beam worker."""
    with _pools_lock:
        if processes not in _pools:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(
                ["rs_pseudolabel.data.own_group", "rs_pseudolabel.data.decode"]
            )
            with _main_unnamed():
                pool = context.Pool(processes)
            atexit.register(pool.terminate)  # before the interpreter tears its modules down
            _pools[processes] = pool
        return _pools[processes]


def settle_pools(timeout: float) -> None:
    """Wait (up to `timeout` s) for a decode pool being started on another thread to be
    whole, so that a command stopped meanwhile ends every process of it in order."""
    if _pools_lock.acquire(timeout=timeout):
        _pools_lock.release()


def warm_pool(processes: int) -> None:
    """Start `decode_pool(processes)` on a thread: where the workers are threads of this
    process, the pool (a fork server importing Pillow, then its forks) comes up on another
    core while Beam starts, instead of after it."""
    if processes > 0:
        threading.Thread(target=_warm, args=(processes,), daemon=True).start()


def _warm(processes: int) -> None:
    """A pool that could not start here is started again, and its error said, by the job's
    own first call; one whose fork server a stop (SIGTERM or Ctrl-C to the whole process
    group, before the server left it) killed mid-start says nothing either."""
    try:
        decode_pool(processes)
    except Exception:  # noqa: BLE001 - said by the job's own call, or the stop's line
        pass


def _hash_all(images: list[bytes]) -> list[bytes]:
    return [content_hash(data) for data in images]


def content_hashes(images: list[bytes]) -> list[bytes]:
    """The content hashes of a chunk, on a few threads of this process: BLAKE2b releases the
    GIL, so hashing runs on other cores than the thread that reads (and the one that drives
    the device)."""
    with _pools_lock:
        if not _hashers:
            _hashers.append(ThreadPoolExecutor(HASH_SLICES, thread_name_prefix="hash"))
    step = -(-len(images) // HASH_SLICES) or 1
    parts = [images[i : i + step] for i in range(0, len(images), step)]
    return [h for part in _hashers[0].map(_hash_all, parts) for h in part]


@dataclass
class InputTally:
    """What one shard's input side did: decode seconds (summed over the processes and the
    device path), how many images each way decoded, and the device decoder's calls (a
    refused JPEG costs about 2 log2 n more, not n)."""

    decode_seconds: float = 0.0
    on_device: int = 0
    on_cpu: int = 0
    decode_calls: int = 0
    jpeg: int = 0  # images that are JPEGs, the one format --decode device takes

    def count(self, chunk: list[Item]) -> None:
        """Note a chunk's JPEGs, by their first bytes: whether the device could decode the
        corpus is stats' advice, for a corpus of PNGs no longer --decode device."""
        self.jpeg += sum(data[:2] == JPEG_START for _, data, _ in chunk)


@dataclass
class Decoded:
    """A decoded chunk: the usable samples' keys, hashes and pixels ((n, crop, crop, 3)
    uint8 on the teacher's device), and (key, reason) for the others."""

    keys: list[str]
    hashes: list[bytes]
    pixels: torch.Tensor
    drops: list[tuple[str, str]] = field(default_factory=list)


class _Done:
    """A result computed in this thread, read as a pool's AsyncResult is."""

    def __init__(self, value: object) -> None:
        self.value = value

    def get(self) -> object:
        return self.value


class CpuDecoder:
    """Chunks in, decoded chunks out, in order; `processes=0` decodes in this thread."""

    def __init__(self, crop: EvalCrop, processes: int, feed: DeviceFeed) -> None:
        self.crop, self.processes, self.feed = crop, processes, feed
        self.pool = decode_pool(processes) if processes > 0 else None
        self.work = partial(eval_stack, crop)

    def submit(self, images: list[bytes]):
        """Start decoding `images`; `.get()` gives eval_stack's (pixels, reasons, seconds)."""
        if self.pool is None:
            return _Done(self.work(images))
        return self.pool.apply_async(self.work, (images,))

    def __call__(self, chunks: Iterable[list[Item]], tally: InputTally) -> Iterator[Decoded]:
        pending: deque = deque()
        ahead = AHEAD_PER_PROCESS * max(1, self.processes)
        for chunk in chunks:
            pending.append((chunk, self.submit([data for _, data, _ in chunk])))
            if len(pending) > ahead:
                yield self._finish(*pending.popleft(), tally)
        while pending:
            yield self._finish(*pending.popleft(), tally)

    def _finish(self, chunk: list[Item], result, tally: InputTally) -> Decoded:
        pixels, reasons, seconds = result.get()
        tally.decode_seconds += seconds
        tally.on_cpu += len(chunk)
        tally.count(chunk)
        out = Decoded([], [], self.feed.to_device(pixels))
        for (key, _, digest), reason in zip(chunk, reasons, strict=True):
            if reason is None:
                out.keys.append(key)
                out.hashes.append(digest)
            else:
                out.drops.append((key, reason))
        return out


def device_takes(data: bytes) -> bool:
    """A JPEG the device path decodes: Huffman-coded, gray or YCbCr (CMYK's colour conversion
    differs between decoders; Pillow's is the reference), not over the pixel limit, and whole
    (ending in its end-of-image marker). Everything else is the CPU path's, with its reasons."""
    header = jpeg_header(data)
    return (
        header is not None
        and header.components in (1, 3)
        and 0 < header.width * header.height <= MAX_PIXELS
        and data[-2:] == b"\xff\xd9"
    )


class DeviceDecoder:
    """JPEG batches decoded and cropped on the teacher's device; the CPU pool for the rest.

    torchvision's CUDA `decode_jpeg` allocates its outputs on the caller's current stream
    (here the feed's side stream) but writes them from a private pool stream that does not
    wait for the caller's: a block freed while kernels queued on the side stream still read
    it (the last chunk's crops, the batch being normalised) can be handed to the decoder and
    overwritten before those kernels run, putting one image's pixels in another's place.
    So the side stream is drained before every decode call (`DeviceFeed.drain`), which also
    keeps every tensor a queued kernel reads alive until it has run; on the CPU the drain
    is a no-op and the call order is what the tests pin.
    """

    def __init__(self, crop: EvalCrop, device: torch.device, cpu: CpuDecoder) -> None:
        from torchvision.transforms import InterpolationMode

        self.crop, self.device, self.cpu, self.feed = crop, device, cpu, cpu.feed
        self.interpolation = InterpolationMode(crop.interpolation)
        self.fits = 0  # the largest decode call known to fit in the device's memory (0: any)

    def __call__(self, chunks: Iterable[list[Item]], tally: InputTally) -> Iterator[Decoded]:
        pending: deque = deque()
        for chunk in chunks:
            taken = [i for i, (_, data, _) in enumerate(chunk) if device_takes(data)]
            chosen = set(taken)
            rest = {i: self.cpu.submit([chunk[i][1]]) for i in range(len(chunk)) if i not in chosen}
            pending.append((chunk, taken, rest))
            if len(pending) > AHEAD_CHUNKS:
                yield self._finish(*pending.popleft(), tally)
        while pending:
            yield self._finish(*pending.popleft(), tally)

    def _finish(self, chunk: list[Item], taken: list[int], rest: dict, tally: InputTally):
        started = time.perf_counter()
        images = [chunk[i][1] for i in taken]
        step = self.fits or len(images) or 1
        crops = [
            c
            for at in range(0, len(images), step)
            for c in self._decode(images[at : at + step], tally)
        ]
        on_device = {}
        for i, pixels in zip(taken, crops, strict=True):
            if pixels is None:  # refused by the device decoder: the CPU names its reason
                rest[i] = self.cpu.submit([chunk[i][1]])
            else:
                on_device[i] = pixels
        tally.decode_seconds += time.perf_counter() - started
        tally.on_device += len(on_device)
        tally.on_cpu += len(rest)
        tally.count(chunk)
        keys, hashes, drops, cpu_rows, order = [], [], [], [], []
        for i, (key, _, digest) in enumerate(chunk):
            if i in on_device:
                order.append(on_device[i])
            else:
                pixels, reasons, seconds = rest[i].get()
                tally.decode_seconds += seconds
                if reasons[0] is not None:
                    drops.append((key, reasons[0]))
                    continue
                order.append(len(cpu_rows))
                cpu_rows.append(pixels)
            keys.append(key)
            hashes.append(digest)
        # One copy of the CPU's crops, then one stack in the chunk's order: no index tensor
        # (a list index is a blocking host-to-device copy).
        from_cpu = self.feed.to_device(np.concatenate(cpu_rows)) if cpu_rows else None
        rows = [from_cpu[row] if isinstance(row, int) else row for row in order]
        size = self.crop.crop
        if not rows:
            out = torch.empty((0, size, size, 3), dtype=torch.uint8, device=self.device)
        else:
            out = torch.stack(rows)
        return Decoded(keys, hashes, out, drops)

    def _decode(self, images: list[bytes], tally: InputTally) -> list[torch.Tensor | None]:
        """Crops of `images` decoded on the device, None for each one it refuses. torchvision
        gives no partial result: a failed call is split in halves, so one refused JPEG in n
        costs about 2 log2 n calls. Out of memory (which torchvision reports as a plain
        RuntimeError) is never a bad image: the halves are remembered for the calls after,
        and a single image that does not fit fails the shard with one line."""
        tally.decode_calls += 1
        self.feed.drain()  # see the class's docstring: never decode over a queued read
        try:
            decoded = self.decode_batch(images)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one too
            oom = out_of_memory(exc)
            if len(images) == 1:
                if oom:
                    raise UsageError(
                        f"{self.device} ran out of memory decoding one JPEG of "
                        f"{len(images[0])} bytes: lower --batch-size, or use --decode cpu"
                    ) from exc
                return [None]
            half = len(images) // 2
            if oom:
                self.fits = min(self.fits or half, half)
                self.feed.release_cached()
            return self._decode(images[:half], tally) + self._decode(images[half:], tally)
        return self._crops(decoded)

    def decode_batch(self, images: list[bytes]) -> list[torch.Tensor]:
        """torchvision's batched JPEG decode on the device: (3, H, W) uint8 each."""
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's notice
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def _crops(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """The eval resize and center crop, one call per group of images of the same size;
        (3, H, W) in, (crop, crop, 3) out."""
        from torchvision.transforms.v2 import functional as F

        size, groups = self.crop.crop, {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for members in groups.values():
            batch = torch.stack([images[i] for i in members])
            resized = F.resize(batch, [self.crop.resize], self.interpolation, antialias=True)
            cropped = F.center_crop(resized, [size, size]).permute(0, 2, 3, 1)
            for j, i in enumerate(members):
                out[i] = cropped[j]
        return out


def out_of_memory(exc: BaseException) -> bool:
    """Whether an error is the device running out of memory: torch's own, or one that
    torchvision's decoder wrapped ("Error while decoding JPEG images: CUDA out of memory")."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


_nvjpeg_owner: list[torch.device] = []  # the GPU whose nvJPEG decoder this process holds


def decode_path(mode: str, where: torch.device) -> str:
    """ "device" or "cpu" for a teacher on `where` under `--decode mode`: `auto` is the device
    path on CUDA. torchvision keeps one nvJPEG decoder per process, behind one lock, and
    rebuilds it (leaking the old one) whenever a call names another GPU than the last, so
    the first GPU of a process to decode on the device keeps it, and the process's other
    GPUs decode on the CPU (one worker process per GPU decodes on every GPU)."""
    if mode not in DECODERS:
        raise UsageError(f"--decode must be one of {', '.join(DECODERS)}, got {mode!r}")
    if not (mode in ("device", "gpu") or (mode == "auto" and where.type == "cuda")):
        return "cpu"
    if where.type == "cuda":
        with _pools_lock:
            if not _nvjpeg_owner:
                _nvjpeg_owner.append(where)
            owner = _nvjpeg_owner[0]
        if owner != where:
            say(
                f"label: {where} decodes on the CPU: torchvision's nvJPEG decoder is {owner}'s "
                "in this process (one worker process per GPU decodes on each)"
            )
            return "cpu"
    return "device"


def make_decoder(crop: EvalCrop, mode: str, device: str, processes: int):
    """The decoder a worker feeds its teacher with (see `decode_path`)."""
    where = torch.device(device)
    path = decode_path(mode, where)
    cpu = CpuDecoder(crop, processes, DeviceFeed(where))
    return DeviceDecoder(crop, where, cpu) if path == "device" else cpu

"""The work of `pipeline label` on one shard: decode, transform, batched forward, sidecar out.

A shard is the unit of work, of resumption and of atomic output. Batches are cut at fixed
positions within a shard, so a rerun writes the same bytes whatever the number of workers
or decode processes. Nothing here imports Beam: the Beam job (pipeline/label.py) wraps it,
and so can a plain script on a GPU machine (bench/gpu_label.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from data.decode import find_image
from data.errors import Drop, UsageError
from data.read import iter_shard
from data.records import PseudoLabel, pseudo_sample, shard_header
from data.stages import Behind, ahead
from data.storage import basename, join
from data.write import AtomicShard
from pipeline.confidence import conf_bins, sparse_to_json
from pipeline.label_decode import InputTally, content_hashes, make_decoder
from pipeline.options import LABEL_BATCH
from pipeline.reports import ShardReport, write_shard_report
from pipeline.summaries import LabelSummary
from teachers import Predictor, load_teacher, resolve_device
from teachers.inference import DeviceFeed, eval_crop, normalize

EMBED_DIM = 256


def sidecar_names(sources: list[str]) -> list[str]:
    """One sidecar name per source shard, in order: the shard's own name (as .tar), or, where
    two input folders hold the same name, its path below their common folder with "/" as
    "__". Names that would still collide are refused before anything is written."""
    names = [_tar_name(basename(u)) for u in sources]
    if len(set(names)) < len(names):
        folders = [u.rsplit("/", 1)[0].split("/") for u in sources]
        common = 0
        while all(len(f) > common and f[common] == folders[0][common] for f in folders):
            common += 1
        names = [
            _tar_name("__".join(folder[common:] + [basename(url)]))
            for folder, url in zip(folders, sources, strict=True)
        ]
    first: dict[str, str] = {}
    for name, url in zip(names, sources, strict=True):
        if name in first:
            raise UsageError(
                f"{first[name]} and {url} would both be labeled into {name}; "
                "rename one of them or label them in separate jobs"
            )
        first[name] = url
    return names


def _tar_name(name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".tar"
    return name + ".tar"


def embedding_projection(dim: int, out_dim: int = EMBED_DIM) -> torch.Tensor | None:
    """A fixed random projection: cosine similarity survives it (Johnson-Lindenstrauss), and
    256 float16 values keep the record small. Seeded by the feature size so the filter's
    evaluation embeddings come out in the same space."""
    if dim <= out_dim:
        return None
    gen = torch.Generator().manual_seed(dim)
    return torch.randn(dim, out_dim, generator=gen) / out_dim**0.5


INPUT_AHEAD = 3  # decoded batches waiting for the forward pass
OUTPUT_BEHIND = 4  # labeled batches waiting to be written


def default_batch(device: str) -> int:
    return LABEL_BATCH.get(torch.device(device).type, LABEL_BATCH["cpu"])


@dataclass
class Labels:
    """A batch's labels on their way back from the device: top-k indices and probabilities,
    entropy and (when asked for) the embedding, with the event that marks them copied."""

    keys: list[str]
    hashes: list[bytes]
    parts: list[torch.Tensor]
    copied: torch.cuda.Event | None

    def arrays(self) -> list[np.ndarray]:
        if self.copied is not None:
            self.copied.synchronize()
        return [part.numpy() for part in self.parts]


@dataclass
class Teacher:
    """What a worker holds once per device: the model, how to feed it, and its decoder."""

    predictor: Predictor
    decoder: Callable
    mean: torch.Tensor  # per channel, on the device: normalising needs no copy
    std: torch.Tensor
    teacher_id: str
    projection: torch.Tensor | None
    fits: int = 0  # the largest batch known to fit in the device's memory (0: not limited)

    @classmethod
    def load(
        cls,
        teacher: str,
        weights: str | None,
        device: str,
        expected_id: str | None = None,
        decode: str = "auto",
        processes: int = 0,
        compile: bool = False,
    ) -> Teacher:
        device = resolve_device(device)
        model, info = load_teacher(teacher, weights, device=device)
        if expected_id is not None and info.teacher_id != expected_id:
            raise UsageError(
                f"the teacher's weights changed after the job started ({expected_id} then, "
                f"{info.teacher_id} now): rerun the command"
            )
        predictor = Predictor(model, device=device, compile=compile)
        # Labeling runs only the teacher: cuDNN may pick its fastest algorithms per shape.
        torch.backends.cudnn.benchmark = predictor.on_cuda
        projection = embedding_projection(predictor.features)
        return cls(
            predictor,
            make_decoder(eval_crop(info), decode, device, processes),
            torch.tensor(info.mean, device=device),
            torch.tensor(info.std, device=device),
            info.teacher_id,
            None if projection is None else projection.to(device),
        )

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @torch.inference_mode()
    def prepare(self, keys: list[str], hashes: list[bytes], pixels: torch.Tensor) -> Batch:
        """A batch of uint8 crops on the device, normalised there by the input thread (on
        its side stream on CUDA), so the driving thread only runs the model."""
        inputs = normalize(pixels, self.mean, self.std)
        return Batch(keys, hashes, inputs, self.decoder.feed.mark())

    @torch.inference_mode()
    def label(self, batch: Batch, k: int, embed: bool) -> Labels:
        """Forward, softmax, top-k, entropy and the embedding of a prepared batch on its
        device; only the k values per sample (and the embedding) are copied back, without
        waiting for them: `Labels.arrays` does."""
        DeviceFeed.accept(batch.inputs, batch.ready)
        probs, features = self._forward(batch.inputs)
        top_p, top_i = probs.topk(min(k, probs.shape[1]), dim=1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
        parts = [top_i, top_p, entropy]
        if embed:
            emb = features @ self.projection if self.projection is not None else features
            parts.append(torch.nn.functional.normalize(emb, dim=1))
        parts = [part.to("cpu", non_blocking=True) for part in parts]
        return Labels(batch.keys, batch.hashes, parts, self.decoder.feed.mark(current=True))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass in pieces that fit: out of memory halves the pieces (remembered
        for the batches after), and is never taken for a bad image; one image that does not
        fit fails the shard with one line."""
        step = self.fits or len(x)
        try:
            outs = [self.predictor.forward(x[i : i + step]) for i in range(0, len(x), step)]
        except torch.OutOfMemoryError as exc:
            if step == 1:
                raise UsageError(
                    f"{self.device} ran out of memory in the forward pass of one image: "
                    "label on a larger device, or with a smaller teacher"
                ) from exc
            self.fits = step // 2
            self.decoder.feed.release_cached()
            return self._forward(x)
        if len(outs) == 1:
            return outs[0]
        return torch.cat([p for p, _ in outs]), torch.cat([f for _, f in outs])


class Teachers:
    """A worker process's teachers, one per device it sees, each loaded when a thread first
    needs it. Threads are spread over the devices in turn, from one chosen by the process id
    (the processes of one machine start on different devices); `forwards` bounds the
    forward passes in flight on each device (None: 1 on a GPU, none on the CPU), so memory
    does not grow with the threads."""

    def __init__(
        self, load: Callable[[str], Teacher], devices: list[str], forwards: int | None
    ) -> None:
        self.load, self.devices, self.loaded = load, devices, {}
        self.slots = {d: forward_slot(d, forwards) for d in devices}
        self.turn = os.getpid() % len(devices)
        self.lock = threading.Lock()

    def assign(self) -> tuple[Teacher, AbstractContextManager]:
        """The teacher (and its device's slot) for the next thread."""
        with self.lock:
            device = self.devices[self.turn % len(self.devices)]
            self.turn += 1
            if device not in self.loaded:
                self.loaded[device] = self.load(device)
            return self.loaded[device], self.slots[device]


def forward_slot(device: str, forwards: int | None) -> AbstractContextManager:
    """What a thread holds while it runs a forward pass on `device`: at most `forwards` at
    once (None: 1 on a GPU, no bound on the CPU)."""
    if forwards is None:
        forwards = 1 if torch.device(device).type == "cuda" else 0
    return threading.BoundedSemaphore(forwards) if forwards > 0 else nullcontext()


@dataclass
class Batch:
    """A forward pass's worth of decodable samples, normalised on the teacher's device."""

    keys: list[str]
    hashes: list[bytes]
    inputs: torch.Tensor  # (n, 3, crop, crop) float, laid out channels-last
    ready: torch.cuda.Event | None


def label_shard(
    url: str,
    name: str,
    out_dir: str,
    teacher: Teacher,
    batch_size: int,
    topk: int,
    embed: bool,
    slot: AbstractContextManager | None = None,
) -> ShardReport:
    """Label one shard into the sidecar `out_dir/name`; returns what went in and out.

    Three threads: one reads, hashes and decodes (`ahead`), this one drives the device (one
    call per batch, nothing per image), one writes the records (`Behind`). `slot` bounds the
    forward passes in flight on the device. Every sample read is counted once: labeled, or
    dropped with a reason. A key seen twice in one shard keeps its first sample (a second
    label under the same key could never be told apart from the first downstream)."""
    started = time.monotonic()
    out_url = join(out_dir, name)
    report = ShardReport(source=url, output=out_url)
    input_drops: list[Drop] = []  # the input thread's; joined to the report at the end
    tally = InputTally()
    summary = LabelSummary()
    by_class: dict[int, Counter] = {}  # the filter's confidence counts, per class
    feed = teacher.decoder.feed

    def read_error(drop: Drop) -> None:
        input_drops.append(drop)
        if drop.key is not None:  # a sample read from the shard but never yielded (unsafe name)
            report.samples_in += 1

    def chunks() -> Iterator[list]:
        seen: set[str] = set()
        samples = iter_shard(url, read_error)
        while True:
            tick = time.monotonic()
            chunk = []
            for sample in samples:
                report.samples_in += 1
                key = sample["__key__"]
                found = find_image(sample)
                if key in seen:
                    input_drops.append(Drop(url, key, "duplicate_key", "an earlier sample has it"))
                elif found is None:
                    seen.add(key)
                    input_drops.append(Drop(url, key, "no_image"))
                else:
                    seen.add(key)
                    chunk.append((key, found[1]))
                    if len(chunk) == batch_size:
                        break
            if not chunk:
                report.read_seconds += time.monotonic() - tick
                return
            hashes = content_hashes([data for _, data in chunk])
            report.read_seconds += time.monotonic() - tick
            yield [(key, data, digest) for (key, data), digest in zip(chunk, hashes, strict=True)]

    def batches() -> Iterator[Batch]:
        """Decoded chunks cut into batches of `batch_size` decodable samples."""
        keys: list[str] = []
        hashes: list[bytes] = []
        parts: list[torch.Tensor] = []
        with feed.context(), torch.inference_mode():
            for decoded in teacher.decoder(chunks(), tally):
                input_drops.extend(Drop(url, key, reason) for key, reason in decoded.drops)
                keys += decoded.keys
                hashes += decoded.hashes
                parts.append(decoded.pixels)
                while len(keys) >= batch_size:
                    pixels = torch.cat(parts) if len(parts) > 1 else parts[0]
                    yield teacher.prepare(
                        keys[:batch_size], hashes[:batch_size], pixels[:batch_size]
                    )
                    keys, hashes = keys[batch_size:], hashes[batch_size:]
                    parts = [pixels[batch_size:]]
            if keys:
                yield teacher.prepare(keys, hashes, torch.cat(parts))

    def write(labels: Labels) -> None:
        top_i, top_p, ent, *emb = labels.arrays()
        conf = top_p[:, 0]
        # Binned as the record holds the confidence (float16), as the filter reads it.
        for cls, b in zip(top_i[:, 0].tolist(), conf_bins(np.float16(conf)).tolist(), strict=True):
            by_class.setdefault(cls, Counter())[b] += 1
        for j, key in enumerate(labels.keys):
            label = PseudoLabel(
                key,
                top_i[j],
                top_p[j].astype(np.float16),
                float(conf[j]),
                float(ent[j]),
                labels.hashes[j],
                emb[0][j].astype(np.float16) if embed else None,
            )
            shard.write(pseudo_sample(label))
            # What the record holds (float16), so a scan of the sidecars agrees exactly.
            summary.add(label.top1, *np.float16([label.confidence, label.entropy]).tolist())

    def lap() -> float:
        """Seconds since the last lap: every moment of the driving thread is counted once."""
        nonlocal last
        now = time.monotonic()
        seconds, last = now - last, now
        return seconds

    last = started
    shard = AtomicShard(out_url)
    writer = Behind(write, OUTPUT_BEHIND)
    try:
        shard.write(shard_header(teacher=teacher.teacher_id, source=url, topk=topk, embed=embed))
        inputs = ahead(batches(), INPUT_AHEAD)
        report.output_seconds += lap()
        while True:
            batch = next(inputs, None)
            report.input_wait_seconds += lap()
            if batch is None:
                break
            with slot or nullcontext():
                labels = teacher.label(batch, topk, embed)
            report.forward_seconds += lap()
            report.last_forward_at = time.time()
            report.first_forward_at = report.first_forward_at or report.last_forward_at
            writer.put(labels)
            report.output_seconds += lap()
        writer.close()
        report.drops = input_drops
        report.samples_out = shard.count - 1
        report.decode_seconds, report.write_seconds = tally.decode_seconds, writer.busy_seconds
        report.on_device, report.on_cpu = tally.on_device, tally.on_cpu
        report.decode_calls = tally.decode_calls
        report.stats = {
            **summary.to_json(),
            "bytes": shard.close_tar(),
            "class_confidences": sparse_to_json(by_class),
        }
        report.output_seconds += lap()
        report.seconds = time.monotonic() - started
        write_shard_report(out_dir, report, name)
        shard.commit()
    except BaseException:
        writer.close(abandon=True)
        shard.abort()
        raise
    return report

"""The work of `pipeline label` on one shard: decode, transform, batched forward, sidecar out.

A shard is the unit of work, of resumption and of atomic output. Batches are cut at fixed
positions within a shard, so a rerun writes the same bytes whatever the number of workers
or decode processes. Nothing here imports Beam: the Beam job (pipeline/label.py) wraps it,
and so does the GPU check on a machine without Beam (bench/gpu_check.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from rs_pseudolabel.data.decode import find_image, no_image_detail
from rs_pseudolabel.data.device import DeviceFeed, normalize, resolve_device
from rs_pseudolabel.data.errors import Drop, UsageError
from rs_pseudolabel.data.read import iter_shard
from rs_pseudolabel.data.records import PseudoLabel, pseudo_sample, shard_header
from rs_pseudolabel.data.stages import Behind, ahead
from rs_pseudolabel.data.storage import basename, join
from rs_pseudolabel.data.write import AtomicShard
from rs_pseudolabel.pipeline.confidence import conf_bins, sparse_to_json
from rs_pseudolabel.pipeline.label_decode import InputTally, content_hashes, make_decoder
from rs_pseudolabel.pipeline.options import LABEL_BATCH
from rs_pseudolabel.pipeline.reports import ShardReport, write_shard_report
from rs_pseudolabel.pipeline.summaries import LabelSummary
from rs_pseudolabel.teachers import Predictor, TeacherInfo, load_teacher
from rs_pseudolabel.teachers.inference import eval_crop
from rs_pseudolabel.teachers.registry import is_model_name

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


TeacherSource = tuple[str, str | None]  # a run directory, or a model name and its weights


def teacher_sources(
    teachers: str | Sequence[str], weights: str | Sequence[str] | None
) -> list[TeacherSource]:
    """Each teacher with its weights: the `--weights` files go, in order, to the teachers
    named by a model name; a run directory carries its own. One line when they do not pair."""
    teachers = [teachers] if isinstance(teachers, str) else list(teachers)
    files = [weights] if isinstance(weights, str) else list(weights or ())
    if not teachers:
        raise UsageError("--teacher is required")
    named = [t for t in teachers if is_model_name(t)]
    if len(files) != len(named) and not (len(named) == 1 == len(teachers) and not files):
        raise UsageError(
            f"{len(named)} teacher(s) name a model ({', '.join(named) or 'none'}) and "
            f"{len(files)} --weights file(s) were given: give one --weights per model name, "
            "in the order of the teachers (a run directory carries its own)"
        )
    given = iter(files)
    return [(t, next(given, None) if is_model_name(t) else None) for t in teachers]


def teacher_shares(weights: str | None, count: int) -> list[float]:
    """`--teacher-weights 0.7,0.3` as shares summing to 1 (default: equal)."""
    if weights is None:
        return [1.0 / count] * count
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        values = []
    if len(values) != count or any(not v > 0 for v in values):
        raise UsageError(
            f"--teacher-weights {weights!r} must be {count} positive numbers, one per "
            "--teacher, separated by commas"
        )
    return [v / sum(values) for v in values]


def ensemble_id(ids: Sequence[str], shares: Sequence[float], tta: str = "none") -> str:
    """What made the labels, for manifests and records: one teacher's id, the teachers'
    ids joined by `+` (each `*share` unless the shares are equal), and `|flip` with the
    mirror averaged in. Launcher and workers compute it alike."""
    equal = max(shares) - min(shares) < 1e-9
    made = "+".join(
        i if equal else f"{i}*{share:.4g}" for i, share in zip(ids, shares, strict=True)
    )
    return made + ("|flip" if tta == "flip" else "")


@dataclass(frozen=True)
class Member:
    """A teacher of an ensemble beside the first: its model, its share of the average, and
    the affine map from the first teacher's normalised pixels to its own normalisation."""

    predictor: Predictor
    share: float
    scale: torch.Tensor | None  # (3, 1, 1), None where the normalisations agree
    shift: torch.Tensor | None


@dataclass
class Teacher:
    """What a worker holds once per device: the model(s), how to feed them, and the decoder.
    An ensemble's teachers share the decoder, so they must share the eval crop; their
    probabilities are averaged by `share`, and with `flip` each image's with its mirror's.
    The embedding is the first teacher's (averaged over the views)."""

    predictor: Predictor
    decoder: Callable
    mean: torch.Tensor  # per channel, on the device: normalising needs no copy
    std: torch.Tensor
    teacher_id: str
    projection: torch.Tensor | None
    fits: int = 0  # the largest batch known to fit in the device's memory (0: not limited)
    share: float = 1.0  # the first teacher's share of the average
    others: tuple[Member, ...] = ()
    flip: bool = False

    @classmethod
    def load(
        cls,
        teacher: str | Sequence[str],
        weights: str | Sequence[str] | None,
        device: str,
        expected_id: str | None = None,
        decode: str = "auto",
        processes: int = 0,
        compile: bool = False,
        teacher_weights: str | None = None,
        tta: str = "none",
    ) -> Teacher:
        device = resolve_device(device)
        sources = teacher_sources(teacher, weights)
        shares = teacher_shares(teacher_weights, len(sources))
        loaded = [load_teacher(name, file, device=device) for name, file in sources]
        (model, info), rest = loaded[0], loaded[1:]
        for _, other in rest:
            _check_alike(info, other)
        teacher_id = ensemble_id([i.teacher_id for _, i in loaded], shares, tta)
        if expected_id is not None and teacher_id != expected_id:
            raise UsageError(
                f"the teacher's weights changed after the job started ({expected_id} then, "
                f"{teacher_id} now): rerun the command"
            )
        predictor = Predictor(model, device=device, compile=compile)
        # Labeling runs only the teacher: cuDNN may pick its fastest algorithms per shape.
        torch.backends.cudnn.benchmark = predictor.on_cuda
        projection = embedding_projection(predictor.features)
        mean, std = torch.tensor(info.mean, device=device), torch.tensor(info.std, device=device)
        others = tuple(
            Member(Predictor(m, device=device, compile=compile), share, *_renormal(info, i, device))
            for (m, i), share in zip(rest, shares[1:], strict=True)
        )
        return cls(
            predictor,
            make_decoder(eval_crop(info), decode, device, processes),
            mean,
            std,
            teacher_id,
            None if projection is None else projection.to(device),
            share=shares[0],
            others=others,
            flip=tta == "flip",
        )

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    def admit(self, key: str, image: bytes) -> str | None:
        """Why an image is not to be labeled (None: it is): a model takes every image."""
        return None

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
            outs = [self._average(x[i : i + step]) for i in range(0, len(x), step)]
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

    def _average(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities averaged over the teachers (by share) and the views, and the first
        teacher's features averaged over the views; one teacher and one view: as they are,
        with no arithmetic added to the usual job's forward."""
        if not self.flip and not self.others:
            return self.predictor.forward(x)
        views = (x, x.flip(-1)) if self.flip else (x,)
        outs = [self.predictor.forward(v) for v in views]
        probs = sum(p for p, _ in outs) * (self.share / len(views))
        features = sum(f for _, f in outs) / len(views)
        for member in self.others:
            own = x if member.scale is None else x * member.scale + member.shift
            for view in (own, own.flip(-1)) if self.flip else (own,):
                probs = probs + member.predictor.forward(view)[0] * (member.share / len(views))
        return probs, features


def _check_alike(first: TeacherInfo, other: TeacherInfo) -> None:
    """An ensemble's teachers label one decoded crop into one set of classes."""
    crops = eval_crop(first), eval_crop(other)
    if crops[0] != crops[1]:
        raise UsageError(
            f"the teachers {first.teacher_id} and {other.teacher_id} crop differently "
            f"({crops[0]} and {crops[1]}): an ensemble's teachers share one eval crop"
        )
    if first.num_classes != other.num_classes or (
        None not in (first.class_names, other.class_names)
        and first.class_names != other.class_names
    ):
        raise UsageError(
            f"the teachers {first.teacher_id} and {other.teacher_id} have other classes "
            f"({first.num_classes} and {other.num_classes}, or other names)"
        )


def _renormal(
    first: TeacherInfo, other: TeacherInfo, device: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(scale, shift) taking pixels normalised for `first` to `other`'s normalisation."""
    if (first.mean, first.std) == (other.mean, other.std):
        return None, None
    column = partial(torch.tensor, dtype=torch.float32, device=device)
    m0, s0, m1, s1 = (
        column(v).view(3, 1, 1) for v in (first.mean, first.std, other.mean, other.std)
    )
    return s0 / s1, (m0 - m1) / s1


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


class ShardInput:
    """The input thread's side of one shard: read and check each sample (counted once:
    passed on, or dropped with its reason), hash a chunk's images, decode them, and cut the
    decoded images into batches of `batch_size`. A key seen twice keeps its first sample (a
    second label under the same key could never be told apart from the first downstream)."""

    def __init__(self, url: str, teacher: Teacher, batch_size: int) -> None:
        self.url, self.teacher, self.batch_size = url, teacher, batch_size
        self.drops: list[Drop] = []  # joined to the report at the end
        self.samples_in = 0
        self.read_seconds = 0.0
        self.tally = InputTally()

    def _read_error(self, drop: Drop) -> None:
        self.drops.append(drop)
        if drop.key is not None:  # a sample read from the shard but never yielded (unsafe name)
            self.samples_in += 1

    def _drop(self, key: str, reason: str, detail: str = "") -> None:
        self.drops.append(Drop(self.url, key, reason, detail))

    def chunks(self) -> Iterator[list]:
        """(key, image bytes, content hash) of the usable samples, `batch_size` at a time."""
        seen: set[str] = set()
        samples = iter_shard(self.url, self._read_error)
        while True:
            tick = time.monotonic()
            chunk = []
            for sample in samples:
                self.samples_in += 1
                key = sample["__key__"]
                found = find_image(sample)
                if key in seen:
                    self._drop(key, "duplicate_key", "an earlier sample has it")
                    continue
                seen.add(key)
                if found is None:
                    self._drop(key, "no_image", no_image_detail(sample))
                elif (refused := self.teacher.admit(key, found[1])) is not None:
                    self._drop(key, refused)
                else:
                    chunk.append((key, found[1]))
                    if len(chunk) == self.batch_size:
                        break
            if not chunk:
                self.read_seconds += time.monotonic() - tick
                return
            hashes = content_hashes([data for _, data in chunk])
            self.read_seconds += time.monotonic() - tick
            yield [(key, data, digest) for (key, data), digest in zip(chunk, hashes, strict=True)]

    def batches(self) -> Iterator[Batch]:
        """Decoded chunks cut into batches of `batch_size` decodable samples."""
        size, teacher = self.batch_size, self.teacher
        keys: list[str] = []
        hashes: list[bytes] = []
        parts: list[torch.Tensor] = []
        with teacher.decoder.feed.context(), torch.inference_mode():
            for decoded in teacher.decoder(self.chunks(), self.tally):
                self.drops.extend(Drop(self.url, key, reason) for key, reason in decoded.drops)
                keys += decoded.keys
                hashes += decoded.hashes
                parts.append(decoded.pixels)
                while len(keys) >= size:
                    pixels = torch.cat(parts) if len(parts) > 1 else parts[0]
                    yield teacher.prepare(keys[:size], hashes[:size], pixels[:size])
                    keys, hashes = keys[size:], hashes[size:]
                    parts = [pixels[size:]]
            if keys:
                yield teacher.prepare(keys, hashes, torch.cat(parts))


class RecordWriter:
    """The writer thread's side: each batch's labels as records of the sidecar, counted for
    the summary and the filter's confidence histograms as the records hold them (float16)."""

    def __init__(self, shard: AtomicShard, embed: bool) -> None:
        self.shard, self.embed = shard, embed
        self.summary = LabelSummary()
        self.by_class: dict[int, Counter] = {}  # the filter's confidence counts, per class

    def __call__(self, labels: Labels) -> None:
        top_i, top_p, ent, *emb = labels.arrays()
        conf = top_p[:, 0]
        for cls, b in zip(top_i[:, 0].tolist(), conf_bins(np.float16(conf)).tolist(), strict=True):
            self.by_class.setdefault(cls, Counter())[b] += 1
        for j, key in enumerate(labels.keys):
            label = PseudoLabel(
                key=key,
                indices=top_i[j],
                probs=top_p[j].astype(np.float16),
                confidence=float(conf[j]),
                entropy=float(ent[j]),
                content_hash=labels.hashes[j],
                embedding=emb[0][j].astype(np.float16) if self.embed else None,
            )
            self.shard.write(pseudo_sample(label))
            # What the record holds (float16), so a scan of the sidecars agrees exactly.
            self.summary.add(label.top1, *np.float16([label.confidence, label.entropy]).tolist())


class Laps:
    """The driving thread's time, each moment counted once into one of the report's
    shares (waiting for input, forward, output)."""

    def __init__(self, report: ShardReport, started: float) -> None:
        self.report, self.last = report, started

    def add(self, share: str) -> None:
        now = time.monotonic()
        setattr(self.report, share, getattr(self.report, share) + now - self.last)
        self.last = now


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

    A chain over three threads: the input thread reads, hashes and decodes (`ShardInput`,
    run `ahead`), this one drives the device (one call per batch, nothing per image), and
    the writer thread writes the records (`RecordWriter`, run `Behind`). `slot` bounds the
    forward passes in flight on the device."""
    started = time.monotonic()
    report = ShardReport(source=url, output=join(out_dir, name))
    laps = Laps(report, started)
    source = ShardInput(url, teacher, batch_size)
    shard = AtomicShard(report.output)
    records = RecordWriter(shard, embed)
    writer = Behind(records, OUTPUT_BEHIND)
    try:
        shard.write(shard_header(teacher=teacher.teacher_id, source=url, topk=topk, embed=embed))
        batches = ahead(source.batches(), INPUT_AHEAD)
        laps.add("output_seconds")
        while (batch := next(batches, None)) is not None:
            laps.add("input_wait_seconds")
            with slot or nullcontext():
                labels = teacher.label(batch, topk, embed)
            laps.add("forward_seconds")
            report.last_forward_at = time.time()
            report.first_forward_at = report.first_forward_at or report.last_forward_at
            writer.put(labels)
            laps.add("output_seconds")
        laps.add("input_wait_seconds")
        writer.close()
        _fill_report(report, source, records, writer, shard.count - 1, shard.close_tar())
        laps.add("output_seconds")
        report.seconds = time.monotonic() - started
        write_shard_report(out_dir, report, name)
        shard.commit()
    except BaseException:
        writer.close(abandon=True)
        shard.abort()
        raise
    return report


def _fill_report(
    report: ShardReport,
    source: ShardInput,
    records: RecordWriter,
    writer: Behind,
    samples_out: int,
    size: int,
) -> None:
    """What the threads counted, into the shard's report (`size`: the sidecar's bytes)."""
    tally = source.tally
    report.samples_in, report.samples_out = source.samples_in, samples_out
    report.drops = source.drops
    report.read_seconds = source.read_seconds
    report.decode_seconds, report.write_seconds = tally.decode_seconds, writer.busy_seconds
    report.on_device, report.on_cpu = tally.on_device, tally.on_cpu
    report.decode_calls, report.jpeg = tally.decode_calls, tally.jpeg
    report.stats = {
        **records.summary.to_json(),
        "bytes": size,
        "class_confidences": sparse_to_json(records.by_class),
    }

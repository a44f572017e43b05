"""The work of `pipeline label` on one shard: decode, transform, batched forward, sidecar out.

A shard is the unit of work, of resumption and of atomic output. Batches are cut at fixed
positions within a shard, so a rerun writes the same bytes whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import torch
from apache_beam.utils.shared import Shared

from data.decode import decode_image, find_image
from data.errors import Drop, UsageError
from data.read import iter_shard
from data.records import PseudoLabel, content_hash, pseudo_sample, shard_header
from data.stages import batched, prefetch
from data.storage import basename, join
from data.write import AtomicShard
from pipeline.reports import ShardReport, record_failure, write_shard_report
from pipeline.summaries import LabelSummary
from teachers import Predictor, eval_transform, load_teacher, resolve_device

EMBED_DIM = 256
# What a worker reports instead of crashing: mistakes the user can fix (no GPU for --device
# cuda, weights that do not load, an output it cannot write). Anything else is a bug.
USER_ERRORS = (UsageError, ValueError, OSError)


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


@dataclass
class Teacher:
    """What a worker process holds once: the model and how to feed it."""

    model: torch.nn.Module
    predictor: Predictor
    transform: Callable
    teacher_id: str
    projection: torch.Tensor | None

    @classmethod
    def load(
        cls, teacher: str, weights: str | None, device: str, expected_id: str | None = None
    ) -> Teacher:
        device = resolve_device(device)
        model, info = load_teacher(teacher, weights, device=device)
        if expected_id is not None and info.teacher_id != expected_id:
            raise UsageError(
                f"the teacher's weights changed after the job started ({expected_id} then, "
                f"{info.teacher_id} now): rerun the command"
            )
        predictor = Predictor(model, device=device)
        with torch.inference_mode():
            size = info.eval_size
            _, feats = predictor.predict(torch.zeros(1, 3, size, size))
        return cls(
            model,
            predictor,
            eval_transform(info),
            info.teacher_id,
            embedding_projection(feats.shape[1]),
        )


def _decoded(samples: Iterator[dict], transform: Callable, drops: list[Drop]) -> Iterator[tuple]:
    for sample in samples:
        key, shard = sample["__key__"], sample["__url__"]
        found = find_image(sample)
        if found is None:
            drops.append(Drop(shard, key, "no_image"))
            continue
        img, reason = decode_image(found[1])
        if reason is not None:
            drops.append(Drop(shard, key, reason))
            continue
        yield key, transform(img), content_hash(found[1])


def summarise(
    probs: torch.Tensor, features: torch.Tensor, k: int, projection: torch.Tensor | None
) -> tuple[np.ndarray, ...]:
    """Top-k, confidence, entropy and (optionally) a unit-length embedding for a batch."""
    top_p, top_i = probs.topk(min(k, probs.shape[1]), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    emb = features @ projection if projection is not None else features
    emb = torch.nn.functional.normalize(emb.float(), dim=1)
    return (top_i.numpy(), top_p.numpy(), top_p[:, 0].numpy(), entropy.numpy(), emb.numpy())


def label_shard(
    url: str, name: str, out_dir: str, teacher: Teacher, batch_size: int, topk: int, embed: bool
) -> ShardReport:
    """Label one shard into the sidecar `out_dir/name`; returns what went in and out.

    Every sample read is counted once: labeled, or dropped with a reason. A key seen twice in
    one shard keeps its first sample (a second label under the same key could never be told
    apart from the first downstream)."""
    started = time.monotonic()
    out_url = join(out_dir, name)
    report = ShardReport(source=url, output=out_url)
    seen: set[str] = set()
    summary = LabelSummary()

    def first_of_each_key(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            report.samples_in += 1
            if sample["__key__"] in seen:
                report.drops.append(
                    Drop(url, sample["__key__"], "duplicate_key", "an earlier sample has it")
                )
                continue
            seen.add(sample["__key__"])
            yield sample

    def read_error(drop: Drop) -> None:
        report.drops.append(drop)
        if drop.key is not None:  # a sample read from the shard but never yielded (unsafe name)
            report.samples_in += 1

    samples = first_of_each_key(iter_shard(url, read_error))
    batches = prefetch(batched(_decoded(samples, teacher.transform, report.drops), batch_size))
    shard = AtomicShard(out_url)
    try:
        shard.write(shard_header(teacher=teacher.teacher_id, source=url, topk=topk, embed=embed))
        for batch in batches:
            keys, tensors, hashes = zip(*batch, strict=True)
            tick = time.monotonic()
            probs, features = teacher.predictor.predict(torch.stack(tensors))
            report.forward_seconds += time.monotonic() - tick
            top_i, top_p, conf, ent, emb = summarise(probs, features, topk, teacher.projection)
            for j, key in enumerate(keys):
                label = PseudoLabel(
                    key,
                    top_i[j],
                    top_p[j].astype(np.float16),
                    float(conf[j]),
                    float(ent[j]),
                    hashes[j],
                    emb[j].astype(np.float16) if embed else None,
                )
                shard.write(pseudo_sample(label))
                # What the record holds (float16), so a scan of the sidecars agrees exactly.
                summary.add(label.top1, *np.float16([label.confidence, label.entropy]).tolist())
        report.samples_out = shard.count - 1
        report.seconds = time.monotonic() - started
        report.stats = {**summary.to_json(), "bytes": shard.close_tar()}
        write_shard_report(out_dir, report, name)
        shard.commit()
    except BaseException:
        shard.abort()
        raise
    return report


class LabelShardFn(beam.DoFn):
    """Beam's unit of work: (shard URL, sidecar name) in, its report out. The teacher is
    loaded once per worker process, on the worker's own device, and shared by the threads
    of that process. A mistake the user can fix is recorded for the launcher, not raised."""

    def __init__(
        self,
        teacher: str,
        weights: str | None,
        teacher_id: str,
        out_dir: str,
        batch_size: int,
        topk: int,
        embed: bool,
        device: str,
        threads: int | None,
    ) -> None:
        self.spec = (teacher, weights, device, teacher_id)
        self.out_dir, self.batch_size, self.topk, self.embed = out_dir, batch_size, topk, embed
        self.threads = threads
        self.shared = Shared()

    def setup(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        tag = hashlib.sha1(repr(self.spec).encode()).hexdigest()
        self.teacher, self.failure = None, None
        try:
            self.teacher = self.shared.acquire(lambda: Teacher.load(*self.spec), tag=tag)
        except USER_ERRORS as exc:
            self.failure = exc

    def process(self, element: tuple[str, str]) -> Iterator[dict]:
        url, name = element
        try:
            if self.failure is not None:
                raise self.failure
            report = label_shard(
                url, name, self.out_dir, self.teacher, self.batch_size, self.topk, self.embed
            )
        except USER_ERRORS as exc:
            record_failure(self.out_dir, name, exc)
            return
        beam.metrics.Metrics.counter("label", "images").inc(report.samples_out)
        yield {"output": name, "samples_out": report.samples_out}

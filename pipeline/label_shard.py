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
from data.errors import Drop
from data.read import iter_shard
from data.records import PseudoLabel, content_hash, pseudo_sample, shard_header
from data.stages import batched, prefetch
from data.write import AtomicShard, join
from pipeline.reports import ShardReport, write_shard_report
from teachers import Predictor, eval_transform, load_teacher

EMBED_DIM = 256


def sidecar_url(out_dir: str, source_url: str) -> str:
    """One sidecar per source shard, under the same name, so the pair is found by name."""
    return join(out_dir, source_url.rsplit("/", 1)[-1])


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
    def load(cls, teacher: str, weights: str | None, device: str) -> Teacher:
        model, info = load_teacher(teacher, weights, device=device)
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
    url: str, out_dir: str, teacher: Teacher, batch_size: int, topk: int, embed: bool
) -> ShardReport:
    """Label one shard and commit its sidecar; returns the report of what went in and out."""
    started = time.monotonic()
    out_url = sidecar_url(out_dir, url)
    report = ShardReport(source=url, output=out_url)
    counted = []

    def counting(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            counted.append(1)
            yield sample

    def read_error(drop: Drop) -> None:
        report.drops.append(drop)
        if drop.key is not None:  # a sample read from the shard but never yielded (unsafe name)
            counted.append(1)

    samples = counting(iter_shard(url, read_error))
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
        report.samples_in = len(counted)
        report.samples_out = shard.count - 1
        report.seconds = time.monotonic() - started
        write_shard_report(out_dir, report)
        shard.commit()
    except BaseException:
        shard.abort()
        raise
    return report


class LabelShardFn(beam.DoFn):
    """Beam's unit of work: a shard URL in, its report out. The teacher is loaded once per
    worker process and shared by the threads of that process."""

    def __init__(
        self,
        teacher: str,
        weights: str | None,
        out_dir: str,
        batch_size: int,
        topk: int,
        embed: bool,
        device: str,
        threads: int | None,
    ) -> None:
        self.spec = (teacher, weights, device)
        self.out_dir, self.batch_size, self.topk, self.embed = out_dir, batch_size, topk, embed
        self.threads = threads
        self.shared = Shared()

    def setup(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        tag = hashlib.sha1(repr(self.spec).encode()).hexdigest()
        self.teacher = self.shared.acquire(lambda: Teacher.load(*self.spec), tag=tag)

    def process(self, url: str) -> Iterator[dict]:
        report = label_shard(
            url, self.out_dir, self.teacher, self.batch_size, self.topk, self.embed
        )
        beam.metrics.Metrics.counter("label", "images").inc(report.samples_out)
        beam.metrics.Metrics.counter("label", "dropped").inc(
            len([d for d in report.drops if d.key])
        )
        yield report.to_json()

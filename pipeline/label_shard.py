"""The work of `pipeline label` on one shard: decode, transform, batched forward, sidecar out.

A shard is the unit of work, of resumption and of atomic output. Batches are cut at fixed
positions within a shard, so a rerun writes the same bytes whatever the number of workers
or decode processes. Nothing here imports Beam: the Beam job (pipeline/label.py) wraps it,
and so can a plain script on a GPU machine (bench/gpu_label.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data.decode import find_image
from data.errors import Drop, UsageError
from data.read import iter_shard
from data.records import PseudoLabel, content_hash, pseudo_sample, shard_header
from data.stages import batched
from data.storage import basename, join
from data.write import AtomicShard
from pipeline.filter_rules import conf_bins, sparse_to_json
from pipeline.label_decode import make_decoder
from pipeline.reports import ShardReport, write_shard_report
from pipeline.summaries import LabelSummary
from teachers import Predictor, load_teacher, resolve_device
from teachers.inference import eval_crop, normalize

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


@dataclass
class Teacher:
    """What a worker process holds once: the model, how to feed it, and its decoder."""

    predictor: Predictor
    decoder: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]
    teacher_id: str
    projection: torch.Tensor | None

    @classmethod
    def load(
        cls,
        teacher: str,
        weights: str | None,
        device: str,
        expected_id: str | None = None,
        decode: str = "auto",
        processes: int = 0,
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
            predictor,
            make_decoder(eval_crop(info), decode, device, processes),
            info.mean,
            info.std,
            info.teacher_id,
            embedding_projection(feats.shape[1]),
        )

    def predict(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and features of a batch of HWC uint8 crops, normalised where they
        lie (on the GPU when they were decoded there)."""
        return self.predictor.predict(normalize(torch.stack(pixels), self.mean, self.std))


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
    by_class: dict[int, Counter] = {}  # the filter's confidence counts, per class

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

    def images() -> Iterator[tuple[str, bytes]]:
        for sample in first_of_each_key(iter_shard(url, read_error)):
            found = find_image(sample)
            if found is None:
                report.drops.append(Drop(url, sample["__key__"], "no_image"))
            else:
                yield sample["__key__"], found[1]

    def decodable() -> Iterator[tuple[str, torch.Tensor, bytes]]:
        for chunk in teacher.decoder(batched(images(), batch_size)):
            for key, data, pixels, reason in chunk:
                if reason is not None:
                    report.drops.append(Drop(url, key, reason))
                else:
                    yield key, pixels, content_hash(data)

    shard = AtomicShard(out_url)
    try:
        shard.write(shard_header(teacher=teacher.teacher_id, source=url, topk=topk, embed=embed))
        for batch in batched(decodable(), batch_size):
            keys, pixels, hashes = zip(*batch, strict=True)
            tick = time.monotonic()
            probs, features = teacher.predict(list(pixels))
            report.forward_seconds += time.monotonic() - tick
            report.last_forward_at = time.time()
            report.first_forward_at = report.first_forward_at or report.last_forward_at
            top_i, top_p, conf, ent, emb = summarise(probs, features, topk, teacher.projection)
            # Binned as the record holds the confidence (float16), as the filter reads it.
            for cls, b in zip(
                top_i[:, 0].tolist(), conf_bins(np.float16(conf)).tolist(), strict=True
            ):
                by_class.setdefault(cls, Counter())[b] += 1
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
        report.stats = {
            **summary.to_json(),
            "bytes": shard.close_tar(),
            "class_confidences": sparse_to_json(by_class),
        }
        write_shard_report(out_dir, report, name)
        shard.commit()
    except BaseException:
        shard.abort()
        raise
    return report

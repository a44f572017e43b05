"""`pipeline data ingest`: bring a user's images into the project's shard layout.

Accepted sources: an ImageFolder / ImageNet-train tree (one folder per class), a flat
folder of images (unlabeled), or existing shards (the project's, img2dataset output,
ImageNet WebDataset shards with `.cls`). Every image is checked to decode; what does not
is listed in errors.jsonl with a reason, so later stages start from clean shards.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data.classes import write_class_names
from data.decode import IMAGE_EXTS, decode_image, find_image
from data.errors import Drop
from data.progress import progress_bar
from data.read import iter_samples
from data.records import read_cls
from data.specs import ShardSpecError, expand_shards
from data.write import ShardSequence

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str) -> str:
    """A WebDataset key: no dots (they start the extension) and no slashes (no folders)."""
    return _UNSAFE.sub("_", text).strip("_") or "sample"


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
    )


@dataclass
class IngestResult:
    samples_in: int = 0
    samples_out: int = 0
    drops: list[Drop] = field(default_factory=list)
    classes: list[str] | None = None
    source_kind: str = ""
    shards: list[str] = field(default_factory=list)


def _folder_samples(src: Path, result: IngestResult, seed: int) -> Iterator[dict]:
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and _image_files(p))
    if class_dirs:
        result.source_kind = "imagefolder"
        result.classes = [d.name for d in class_dirs]
        files = [(i, f) for i, d in enumerate(class_dirs) for f in _image_files(d)]
        # Shards in class order would feed a loader worker one class at a time: spread the
        # classes over all shards, in an order fixed by the seed so reruns match.
        random.Random(seed).shuffle(files)
    else:
        result.source_kind = "folder"
        files = [(None, f) for f in _image_files(src)]
    if not files:
        raise ShardSpecError(f"no images or shards found in {src}")
    seen: set[str] = set()
    for cls, path in files:
        key = safe_key(str(path.relative_to(src).with_suffix("")))
        while key in seen:
            key += "_"
        seen.add(key)
        ext = path.suffix.lower().lstrip(".")
        sample = {"__key__": key, "__url__": str(path), ext: path.read_bytes()}
        if cls is not None:
            sample["cls"] = str(cls).encode()
        yield sample


def _checked(samples: Iterator[dict], result: IngestResult) -> Iterator[dict]:
    """Drop samples that a training stage could not use, each with a reason."""
    for sample in samples:
        result.samples_in += 1
        shard, key = sample.get("__url__", ""), sample["__key__"]
        found = find_image(sample)
        if found is None:
            result.drops.append(Drop(shard, key, "no_image"))
            continue
        _, reason = decode_image(found[1])
        if reason is not None:
            result.drops.append(Drop(shard, key, reason))
            continue
        try:
            read_cls(sample)
        except ValueError as exc:
            result.drops.append(Drop(shard, key, "bad_class", str(exc)))
            continue
        result.samples_out += 1
        yield {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}


def ingest(
    src: str, out_dir: str, shard_size: int = 1000, prefix: str = "part", seed: int = 0
) -> IngestResult:
    """Re-shard a source into `out_dir/prefix-NNNNNN.tar`, keys unique and stable."""
    result = IngestResult()
    local = Path(src)
    if local.is_dir() and not any(p.suffix == ".tar" for p in local.iterdir()):
        samples = _folder_samples(local, result, seed)
    else:
        urls = expand_shards(src)
        result.source_kind = "shards"
        samples = iter_samples(urls, result.drops.append)
    seen: set[str] = set()
    with ShardSequence(out_dir, prefix, shard_size) as shards:
        for sample in progress_bar(
            _checked(samples, result), desc="ingest", unit="img", leave=False
        ):
            if sample["__key__"] in seen:
                result.drops.append(Drop("", sample["__key__"], "duplicate_key"))
                result.samples_out -= 1
                continue
            seen.add(sample["__key__"])
            shards.write(sample)
    result.shards = shards.urls
    if result.classes is not None:
        write_class_names(out_dir, result.classes)
    return result

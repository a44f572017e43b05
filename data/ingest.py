"""`pipeline data ingest`: bring a user's images into the project's shard layout.

Accepted sources, local or at any fsspec URL: an ImageFolder / ImageNet-train tree (one
folder per class, images anywhere below it, as torchvision's ImageFolder reads it), a flat
folder of images (unlabeled), or existing shards (the project's, img2dataset output,
ImageNet WebDataset shards with `.cls`, plain or compressed). Every image is checked to
decode; what does not, and every file that is not used (an image beside the class folders,
a stray archive in an image folder, a file that is no image), is listed in errors.jsonl
with a reason, so later stages start from clean shards and nothing goes missing unseen.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from rs_pseudolabel.data.classes import write_class_names
from rs_pseudolabel.data.decode import IMAGE_EXTS, decode_image, find_image, no_image_detail
from rs_pseudolabel.data.errors import Drop
from rs_pseudolabel.data.progress import progress_bar
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import read_cls
from rs_pseudolabel.data.specs import ShardSpecError, expand_shards, is_shard_name
from rs_pseudolabel.data.storage import Entry, absolute, is_dir, read_bytes, walk_entries
from rs_pseudolabel.data.write import ShardSequence

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str) -> str:
    """A WebDataset key: no dots (they start the extension) and no slashes (no folders)."""
    return _UNSAFE.sub("_", text).strip("_") or "sample"


def _is_image(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTS


@dataclass
class IngestResult:
    samples_in: int = 0
    samples_out: int = 0
    drops: list[Drop] = field(default_factory=list)
    classes: list[str] | None = None
    empty_classes: list[str] = field(default_factory=list)
    source_kind: str = ""
    shards: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SourceLayout:
    """What a source folder holds, decided from one recursive listing."""

    kind: str  # "imagefolder", "folder" or "shards"
    files: list[tuple[int | None, Entry, str]]  # (class id, file, path below the root)
    classes: list[str] | None
    skipped: list[tuple[Entry, str, str]]  # (file, path below the root, reason)


def read_layout(src: str, entries: list[Entry], class_dirs: list[str]) -> SourceLayout:
    """Class folders make an ImageFolder (class ids by sorted name, empty ones kept, so ids
    agree between splits); else images make a flat folder; else the shards are the source."""
    root = src.rstrip("/") + "/"
    relative = [(e, e.url[len(root) :]) for e in entries if e.url.startswith(root)]
    classes = sorted(set(class_dirs) | {rel.split("/", 1)[0] for _, rel in relative if "/" in rel})
    if classes:
        ids = {name: i for i, name in enumerate(classes)}
        files, skipped = [], []
        for entry, rel in relative:
            if "/" not in rel:
                skipped.append((entry, rel, "outside_class_folders"))
            elif _is_image(rel):
                files.append((ids[rel.split("/", 1)[0]], entry, rel))
            else:
                skipped.append((entry, rel, "not_an_image"))
        return SourceLayout("imagefolder", files, classes, skipped)
    images = [(None, e, rel) for e, rel in relative if _is_image(rel)]
    if images:
        others = [(e, rel, "not_an_image") for e, rel in relative if not _is_image(rel)]
        return SourceLayout("folder", images, None, others)
    return SourceLayout("shards", [], None, [])


def _folder_samples(layout: SourceLayout, result: IngestResult, seed: int) -> Iterator[dict]:
    files = list(layout.files)
    if layout.kind == "imagefolder":
        # Shards in class order would feed a loader worker one class at a time: spread the
        # classes over all shards, in an order fixed by the seed so reruns match.
        random.Random(seed).shuffle(files)
    seen: set[str] = set()
    for cls, entry, rel in files:
        key = safe_key(rel.rsplit(".", 1)[0])
        while key in seen:
            key += "_"
        seen.add(key)
        ext = rel.rsplit(".", 1)[1].lower()
        sample = {"__key__": key, "__url__": entry.url, ext: read_bytes(entry.url)}
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
            result.drops.append(Drop(shard, key, "no_image", no_image_detail(sample)))
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


def source_entries(src: str) -> tuple[list[Entry], list[str]]:
    """Every file below a source folder (one recursive listing) and its immediate
    subfolders, or ([], []) when the source is not a folder."""
    if not is_dir(src):
        return [], []
    return walk_entries(src)


def ingest(
    src: str, out_dir: str, shard_size: int = 1000, prefix: str = "part", seed: int = 0
) -> IngestResult:
    """Re-shard a source into `out_dir/prefix-NNNNNN.tar`, keys unique and stable."""
    result = IngestResult()
    src = absolute(src)
    entries, class_dirs = source_entries(src)
    layout = read_layout(src, entries, class_dirs)
    if layout.kind == "shards":
        root = src.rstrip("/") + "/"
        shards = [e.url for e in entries if is_shard_name(e.name) and "/" not in e.url[len(root) :]]
        urls = shards if entries else expand_shards(src)
        if not urls:
            raise ShardSpecError(f"no images or shards found in {src}")
        samples = iter_samples(urls, result.drops.append)
    else:
        samples = _folder_samples(layout, result, seed)
    result.source_kind = layout.kind
    result.classes = layout.classes
    for entry, rel, reason in layout.skipped:
        result.samples_in += 1
        result.drops.append(Drop(entry.url, rel, reason))
    if layout.classes:
        used = {cls for cls, _, _ in layout.files}
        result.empty_classes = [c for i, c in enumerate(layout.classes) if i not in used]
    seen: set[str] = set()
    with ShardSequence(out_dir, prefix, shard_size) as out:
        for sample in progress_bar(_checked(samples, result), desc="ingest", unit="img"):
            if sample["__key__"] in seen:
                result.drops.append(Drop("", sample["__key__"], "duplicate_key"))
                result.samples_out -= 1
                continue
            seen.add(sample["__key__"])
            out.write(sample)
    result.shards = out.urls
    if result.classes is not None:
        write_class_names(out_dir, result.classes)
    return result

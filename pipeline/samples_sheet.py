"""`pipeline stats SHARDS --samples FILE.png`: the images behind the histograms.

One row per class (the most frequent ones when there are many) and, along it, a few images
drawn at random from each confidence band of the teacher; for the output of `pipeline
filter`, from what it kept and from each reason it dropped images for. A teacher that
confuses two classes, or a threshold that keeps junk, shows at a glance.

Pseudo-label sidecars hold no images: each record's image is read back from the source
shard its `__shard__.json` header names. For filter output the records are those of the
filter's input (named in its manifest) and their fate comes from its errors.jsonl. Images
are drawn by a hash of (seed, key), so the same sheet comes out of every run, and from at
most MAX_SHARDS shards: a sheet is a look, not a count.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
import struct
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache

from PIL import Image, ImageDraw, ImageFont, ImageOps

from rs_pseudolabel.data.classes import read_class_names
from rs_pseudolabel.data.decode import decode_image, find_image
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.manifest import read_manifest
from rs_pseudolabel.data.progress import say
from rs_pseudolabel.data.read import iter_shard
from rs_pseudolabel.data.records import (
    PSEUDO_EXT,
    content_hash,
    decode_pseudo,
    read_cls,
    read_header,
)
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.data.storage import AtomicFile, exists, join, open_read, parent
from rs_pseudolabel.pipeline.source_roots import Roots, relocated
from rs_pseudolabel.pipeline.source_roots import source_roots as parse_roots

MAX_SHARDS = 32  # shards read, drawn at random
MAX_CLASSES = 10  # rows: the most frequent classes
PER_CELL = 4  # images per class and band (or per class and fate)
BANDS = (0.0, 0.3, 0.6, 0.9)  # lower edges of the confidence bands; 0.3: filter's default
KEPT = "kept"

TILE = 64  # px, every image fitted into a square of this size
GAP = 4
GROUP_GAP = 16
LABEL_WIDTH = 120
CAPTION = 14
TITLE = 22
HEADER = 18
BACKGROUND = (255, 255, 255)
PAD = (236, 236, 236)  # around an image that is not square


@dataclass(frozen=True, order=True)
class Pick:
    """One sample that may be drawn: the lowest `priority` values of a cell are."""

    priority: int
    key: str = field(compare=False)
    cls: int = field(compare=False)
    group: str = field(compare=False)
    confidence: float | None = field(compare=False)
    source: str = field(compare=False)
    digest: bytes | None = field(compare=False)  # a sidecar's content hash of its image


@dataclass
class Sheet:
    """What was drawn and where: rows of classes, column groups, and the picks per cell."""

    title: str
    rows: list[int]
    groups: list[str]
    cells: dict[tuple[int, str], list[Pick]]
    row_labels: dict[int, str]
    group_labels: dict[str, str]
    roots: Roots = ()  # --source-root: where the sidecars' source shards are now

    @property
    def picks(self) -> list[Pick]:
        """The samples drawn onto the sheet: its rows' cells, group by group."""
        return [p for r in self.rows for g in self.groups for p in self.cells.get((r, g), [])]

    @property
    def size(self) -> tuple[int, int]:
        width = LABEL_WIDTH + len(self.groups) * PER_CELL * (TILE + GAP)
        width += (len(self.groups) - 1) * GROUP_GAP + GAP
        width = max(width, round(_font().getlength(self.title)) + 2 * GAP)
        return width, TITLE + HEADER + len(self.rows) * (TILE + CAPTION + GAP) + GAP

    def tile_box(self, row: int, group: int, slot: int) -> tuple[int, int, int, int]:
        """Where the image of (row, group, slot) goes: left, top, right, bottom."""
        left = LABEL_WIDTH + group * (PER_CELL * (TILE + GAP) + GROUP_GAP) + slot * (TILE + GAP)
        top = TITLE + HEADER + row * (TILE + CAPTION + GAP)
        return left, top, left + TILE, top + TILE


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=11)


def _priority(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest())


def _band_names() -> list[str]:
    highs = [*BANDS[1:], 1.0]
    return [f"confidence {low:.1f}-{high:.1f}" for low, high in zip(BANDS, highs, strict=True)]


def _band(confidence: float) -> str:
    return _band_names()[max(i for i, edge in enumerate(BANDS) if edge <= confidence)]


def _records(url: str) -> Iterator[tuple[str, int, float | None, str, bytes | None]]:
    """(key, class, confidence, shard holding its image, its content hash) for each sample
    with a class: the `.cls`, else the teacher's top-1; the image is in this shard (no hash
    to check), or in the source shard a sidecar's header names."""
    header: dict = {}
    for sample in iter_shard(url, lambda drop: None):
        found = read_header(sample)
        if found is not None:
            header = found
            continue
        try:
            label = decode_pseudo(sample["__key__"], sample[PSEUDO_EXT])
        except (KeyError, ValueError, struct.error):  # none, or damaged: stats counts those
            label = None
        try:
            cls = read_cls(sample)
        except ValueError:
            cls = None
        if cls is None and label is not None:
            cls = label.top1
        if cls is None:
            continue
        here = find_image(sample) is not None
        source = url if here else header.get("source")
        if source:
            confidence = None if label is None else label.confidence
            digest = None if here or label is None else label.content_hash
            yield sample["__key__"], cls, confidence, source, digest


def _fates(folder: str, keys: set[str]) -> dict[str, str]:
    """Why filter dropped each of `keys` that it dropped (errors.jsonl, streamed)."""
    fates = {}
    with open_read(join(folder, "errors.jsonl")) as f:
        for line in f:
            drop = json.loads(line)
            if drop["key"] in keys:
                fates[drop["key"]] = drop["reason"]
    return fates


def collect(spec: str, seed: int = 0, roots: Roots = ()) -> Sheet:
    """Draw the sheet's samples from the shards of `spec` (no images read yet)."""
    urls = expand_shards(spec)
    folder = urls[0].rsplit("/", 1)[0]
    manifest = read_manifest(folder) or {}
    filtered = manifest.get("stage") == "filter"
    if filtered:  # the records are those of the filter's input, with a fate each
        urls = expand_shards(manifest["args"]["input"])
    shards = sorted(random.Random(seed).sample(urls, min(len(urls), MAX_SHARDS)))
    records = [record for url in shards for record in _records(url)]
    if not records:
        raise UsageError(f"no sample in {spec} has a class or a pseudo-label to lay out by")
    fates = _fates(folder, {key for key, *_ in records}) if filtered else {}

    counts: Counter = Counter()
    group_counts: Counter = Counter()
    cells: dict[tuple[int, str], list[Pick]] = defaultdict(list)
    for key, cls, confidence, source, digest in records:
        if filtered:
            group = fates.get(key, KEPT)
        else:
            group = "samples" if confidence is None else _band(confidence)
        counts[cls] += 1
        group_counts[group] += 1
        pick = Pick(-_priority(seed, key), key, cls, group, confidence, source, digest)
        cell = cells[cls, group]
        if len(cell) < PER_CELL:
            heapq.heappush(cell, pick)
        elif pick > cell[0]:
            heapq.heapreplace(cell, pick)

    rows = [cls for cls, _ in sorted(counts.items(), key=lambda c: (-c[1], c[0]))][:MAX_CLASSES]
    if filtered:
        groups = [KEPT] * (KEPT in group_counts)
        groups += [g for g, _ in group_counts.most_common() if g != KEPT]
    elif "samples" in group_counts:  # no pseudo-labels, so no confidence
        groups = ["samples"]
    else:  # every band, even an empty one: the columns of two sheets line up
        groups = _band_names()
    names = read_class_names(urls) or read_class_names([records[0][3]])
    thresholds = manifest.get("class_thresholds", {}) if filtered else {}
    what = "kept and dropped by pipeline filter" if filtered else "by confidence band"
    return Sheet(
        title=f"{spec}: {len(records):,} samples from {len(shards)} of {len(urls)} shards, "
        f"{what}; up to {PER_CELL} drawn per cell (seed {seed})",
        rows=rows,
        groups=groups,
        cells={cell: sorted(picks, reverse=True) for cell, picks in cells.items()},
        row_labels={cls: _row_label(cls, counts[cls], names, thresholds) for cls in rows},
        group_labels={g: f"{g} ({group_counts[g]:,})" for g in groups},
        roots=roots,
    )


def _row_label(cls: int, count: int, names: list[str] | None, thresholds: dict) -> str:
    """The class's name and count; for filter output, on a second line, the confidence its
    images needed to be kept (below it: `below_threshold`)."""
    label = f"{names[cls] if names and cls < len(names) else cls} ({count:,})"
    threshold = thresholds.get(str(cls))
    return label if threshold is None else f"{label}\nkept from {threshold:.2f}"


def _tile(image: Image.Image) -> Image.Image:
    """The image fitted into the tile, however long or thin: a side that would shrink below
    a pixel (a 2,000 x 1 banner) keeps one."""
    scale = TILE / max(image.size)
    if min(image.size) * scale < 1:
        image = image.resize(tuple(max(1, round(side * scale)) for side in image.size))
    return ImageOps.pad(image, (TILE, TILE), color=PAD)


@dataclass
class Found:
    """The drawn samples' tiles, and why the others have none, in words."""

    tiles: dict[str, Image.Image]
    missing: dict[str, int]  # source shard read (after --source-root) -> drawn images not there
    changed: int = 0  # found under their key with other bytes than labeled
    undecodable: int = 0


def _images(sheet: Sheet) -> Found:
    """The drawn samples' images, each source shard read once; a sidecar's image is taken
    only if its bytes are those labeled (content hash)."""
    wanted: dict[str, dict[str, bytes | None]] = defaultdict(dict)
    for pick in sheet.picks:
        wanted[relocated(pick.source, sheet.roots)][pick.key] = pick.digest
    found = Found({}, {})
    for source, keys in sorted(wanted.items()):
        for sample in iter_shard(source, lambda drop: None):
            image = find_image(sample) if sample["__key__"] in keys else None
            if image is None:
                continue
            digest = keys[sample["__key__"]]
            if digest is not None and content_hash(image[1]) != digest:
                found.changed += 1
                continue
            decoded, _ = decode_image(image[1])
            if decoded is None:
                found.undecodable += 1
            else:
                found.tiles[sample["__key__"]] = _tile(decoded)
        gone = len(keys) - sum(key in found.tiles for key in keys)
        if gone and not exists(source):
            found.missing[source] = gone
    return found


def _shortfall(found: Found, drawn: int) -> str | None:
    """Why `drawn - len(found.tiles)` images are not on the sheet, in one line."""
    missing = sum(found.missing.values())
    parts = []
    if missing:
        first = next(iter(found.missing))
        parts.append(
            f"{missing} are in source shards that are not there ({len(found.missing)} shards, "
            f"e.g. {first}): if they moved, pass --source-root {parent(first)}=WHERE_THEY_ARE_NOW"
        )
    if found.changed:
        parts.append(f"{found.changed} are other images than labeled (content hash)")
    if found.undecodable:
        parts.append(f"{found.undecodable} cannot be decoded")
    if drawn > len(found.tiles) and not parts:
        parts.append(f"{drawn - len(found.tiles)} are no longer in their shards")
    return "; ".join(parts) or None


def render(sheet: Sheet, path: str) -> int:
    """Draw the sheet as a PNG at `path` (local or fsspec URL); returns the tiles drawn.
    Images that cannot be shown are said in one line: a warning, or the refusal when the
    sheet would have none."""
    found = _images(sheet)
    images, drawn = found.tiles, len(sheet.picks)
    shortfall = _shortfall(found, drawn)
    if shortfall and not images:
        raise UsageError(f"no image of the {drawn} drawn could be shown: {shortfall}")
    if shortfall:
        say(
            f"warning: {drawn - len(images)} of the {drawn} images drawn are not shown: {shortfall}"
        )
    canvas = Image.new("RGB", sheet.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((GAP, GAP), sheet.title, fill="black", font=font)
    tiles = 0
    for g, group in enumerate(sheet.groups):
        left, top, _, _ = sheet.tile_box(0, g, 0)
        draw.text((left, top - HEADER + 2), sheet.group_labels[group], fill="black", font=font)
    for r, row in enumerate(sheet.rows):
        _, top, _, _ = sheet.tile_box(r, 0, 0)
        draw.multiline_text(
            (GAP, top + TILE // 2 - 12), sheet.row_labels[row], fill="black", font=font
        )
        for g, group in enumerate(sheet.groups):
            for slot, pick in enumerate(sheet.cells.get((row, group), [])):
                if pick.key not in images:
                    continue
                box = sheet.tile_box(r, g, slot)
                canvas.paste(images[pick.key], box[:2])
                if pick.confidence is not None:
                    draw.text(
                        (box[0], box[3] + 1), f"{pick.confidence:.2f}", fill="dimgray", font=font
                    )
                tiles += 1
    with AtomicFile(path) as f:
        canvas.save(f, format="PNG")
    return tiles


def write_samples(spec: str, path: str, seed: int = 0, source_roots: Iterable[str] = ()) -> int:
    """`--samples`: collect and render; returns the number of images on the sheet. Sidecars'
    images are read where `source_roots` (OLD=NEW, as for the filter) say they are now."""
    return render(collect(spec, seed, parse_roots(source_roots)), path)

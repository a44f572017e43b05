"""Synthetic photo-like JPEG shards for benchmarks: smooth colour fields with edges and noise,
so file sizes and decode costs resemble real photographs, made on the spot (no download)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from data.write import ShardSequence


def photo_jpeg(rng: np.random.Generator, size: int = 224, quality: int = 90) -> bytes:
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (size, size, 3))
    arr = np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB").filter(ImageFilter.DETAIL)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_corpus(
    out_dir: str,
    images: int,
    shard_size: int = 96,
    size: int = 224,
    seed: int = 0,
    classes: int = 0,
) -> list[str]:
    """`images` JPEGs of `size` px in shards of `shard_size`; with `classes`, each also has a
    random `.cls` label, as in ImageNet training shards."""
    rng = np.random.default_rng(seed)
    with ShardSequence(out_dir, "photos", shard_size) as shards:
        for i in range(images):
            sample = {"__key__": f"photo{i:07d}", "jpg": photo_jpeg(rng, size)}
            if classes:
                sample["cls"] = str(int(rng.integers(classes))).encode()
            shards.write(sample)
    return shards.urls

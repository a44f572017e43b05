"""Synthetic photo-like JPEG shards for benchmarks: smooth colour fields with edges and noise,
so file sizes and decode costs resemble real photographs, made on the spot (no download)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from rs_pseudolabel.data.write import ShardSequence


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


# The mix of a web crawl (sizes 150-1,000 px), drawn per image: share of each kind.
WEB_MIX = {
    "progressive": 0.12,
    "cmyk": 0.04,
    "png": 0.04,
    "webp": 0.03,
    "gif": 0.03,
    "undecodable": 0.02,
}


def web_image(rng: np.random.Generator, kind: str, width: int, height: int) -> tuple[str, bytes]:
    """(extension, bytes) of one photo-like image of `kind` (a WEB_MIX kind or "baseline")."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(img, np.float64) + rng.normal(0, 8, (height, width, 3))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, format="PNG")
    elif kind == "webp":
        img.save(buf, format="WEBP", quality=85)
    elif kind == "gif":
        img.convert("P").save(buf, format="GIF")
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="JPEG", quality=90, progressive=kind == "progressive")
    data = buf.getvalue()
    if kind == "undecodable":  # a JPEG whose entropy-coded data was cut off in transfer
        data = data[: len(data) // 2]
    ext = {"png": "png", "webp": "webp", "gif": "gif"}.get(kind, "jpg")
    return ext, data


def web_samples(count: int, seed: int = 0, sizes: tuple[int, int] = (150, 1000)) -> list[dict]:
    """`count` samples of web variety: sizes drawn from `sizes`, kinds by WEB_MIX."""
    rng = np.random.default_rng(seed)
    kinds, shares = list(WEB_MIX), list(WEB_MIX.values())
    samples = []
    for i in range(count):
        draw = rng.random()
        kind = next(
            (k for k, top in zip(kinds, np.cumsum(shares), strict=True) if draw < top), "baseline"
        )
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
        ext, data = web_image(rng, kind, width, height)
        samples.append({"__key__": f"web{i:08d}", ext: data})
    return samples

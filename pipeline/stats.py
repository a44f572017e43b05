"""`pipeline stats`: what is in a set of shards, as a table, JSON and a PNG.

Works on every shard the project reads or writes: raw images, labeled shards (class
histogram), pseudo-label sidecars (confidence, entropy, top-1 classes) and training shards
(copies per image). Shards are read in parallel, one task per shard, and merged.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
from PIL import Image

from data.classes import read_class_names
from data.decode import find_image
from data.errors import Drop
from data.manifest import read_manifest
from data.progress import progress_bar
from data.read import iter_shard
from data.records import PSEUDO_EXT, SHARD_HEADER_KEY, decode_pseudo, read_cls
from data.specs import expand_shards
from data.write import write_json

CONF_BINS = 20
ENTROPY_STEP = 0.1


@dataclass
class ShardStats:
    """Counts of one shard (or, merged, of many): everything additive."""

    samples: int = 0
    shards: int = 0
    bytes: int = 0
    images: int = 0
    formats: Counter = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    classes: Counter = field(default_factory=Counter)
    top1: Counter = field(default_factory=Counter)
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(CONF_BINS, np.int64))
    entropy: Counter = field(default_factory=Counter)
    hashes: list[bytes] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)

    def merge(self, other: ShardStats) -> None:
        for name in ("samples", "shards", "bytes", "images"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("formats", "classes", "top1", "entropy", "faults"):
            getattr(self, name).update(getattr(other, name))
        self.widths += other.widths
        self.heights += other.heights
        self.confidence += other.confidence
        self.hashes += other.hashes


def _image_size(data: bytes) -> tuple[int, int] | None:
    import io

    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # a stats pass describes bad images, it does not reject them
        return None


def shard_stats(url: str) -> ShardStats:
    stats = ShardStats(shards=1)
    fs, path = fsspec.core.url_to_fs(url)
    stats.bytes = fs.size(path)
    faults: list[Drop] = []
    for sample in iter_shard(url, faults.append):
        if sample["__key__"] == SHARD_HEADER_KEY:
            continue
        stats.samples += 1
        found = find_image(sample)
        if found is not None:
            stats.images += 1
            stats.formats[found[0]] += 1
            size = _image_size(found[1])
            if size is not None:
                stats.widths.append(size[0])
                stats.heights.append(size[1])
        try:
            cls = read_cls(sample)
        except ValueError:
            cls = None
        if cls is not None:
            stats.classes[cls] += 1
        if PSEUDO_EXT in sample:
            label = decode_pseudo(sample["__key__"], sample[PSEUDO_EXT])
            stats.top1[label.top1] += 1
            stats.confidence[min(int(label.confidence * CONF_BINS), CONF_BINS - 1)] += 1
            stats.entropy[int(label.entropy / ENTROPY_STEP)] += 1
            if found is not None:
                stats.hashes.append(label.content_hash)
    stats.faults.update(d.reason for d in faults)
    return stats


def collect(spec: str, workers: int = 2) -> tuple[dict, list[str] | None]:
    urls = expand_shards(spec)
    total = ShardStats()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for stats in progress_bar(
            pool.map(shard_stats, urls), total=len(urls), desc="stats", unit="shard", leave=False
        ):
            total.merge(stats)
    manifest = read_manifest(urls[0].rsplit("/", 1)[0]) or {}
    return summarise(total, manifest), read_class_names(urls)


def summarise(stats: ShardStats, manifest: dict) -> dict:
    """The JSON of SPEC section 5: samples, shards, bytes, class_counts, histograms, drops."""
    copies = Counter(Counter(stats.hashes).values())
    top_entropy = max(stats.entropy, default=-1) + 1
    class_source = stats.classes or stats.top1
    return {
        "samples": stats.samples,
        "shards": stats.shards,
        "bytes": stats.bytes,
        "bytes_per_sample": round(stats.bytes / stats.samples, 1) if stats.samples else None,
        "images": stats.images,
        "formats": dict(stats.formats),
        "image_size": {
            "width": _spread(stats.widths),
            "height": _spread(stats.heights),
        },
        "class_counts": {str(c): n for c, n in sorted(class_source.items())},
        "class_source": "cls" if stats.classes else ("top1" if stats.top1 else None),
        "confidence_hist": {
            "edges": [round(i / CONF_BINS, 3) for i in range(CONF_BINS + 1)],
            "counts": stats.confidence.tolist(),
        },
        "entropy_hist": {
            "edges": [round(i * ENTROPY_STEP, 3) for i in range(top_entropy + 1)],
            "counts": [stats.entropy.get(i, 0) for i in range(top_entropy)],
        },
        "copies_hist": {str(k): v for k, v in sorted(copies.items())},
        "drops": manifest.get("drops", {}),
        "shard_faults": dict(stats.faults) | manifest.get("shard_faults", {}),
    }


def _spread(values: list[int]) -> dict | None:
    if not values:
        return None
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}


def format_report(report: dict, class_names: list[str] | None) -> str:
    def name(cls: str) -> str:
        return class_names[int(cls)] if class_names and int(cls) < len(class_names) else cls

    rows = [
        ("samples", f"{report['samples']:,}"),
        ("shards", f"{report['shards']:,}"),
        ("bytes", f"{report['bytes']:,} ({report['bytes_per_sample']} per sample)"),
        (
            "images",
            f"{report['images']:,} " + " ".join(f"{k}:{v}" for k, v in report["formats"].items()),
        ),
    ]
    size = report["image_size"]
    if size["width"]:
        rows.append(
            (
                "image size",
                f"{size['width']['min']}..{size['width']['max']} x "
                f"{size['height']['min']}..{size['height']['max']} px",
            )
        )
    counts = report["class_counts"]
    if counts:
        values = list(counts.values())
        rows.append(
            (
                f"classes ({report['class_source']})",
                f"{len(counts)}, {min(values)}..{max(values)} per class",
            )
        )
        rows += [(f"  {name(c)}", f"{n:,}") for c, n in list(counts.items())[:20]]
    conf = report["confidence_hist"]["counts"]
    if sum(conf):
        mids = [(i + 0.5) / CONF_BINS for i in range(CONF_BINS)]
        mean = sum(m * c for m, c in zip(mids, conf, strict=True)) / sum(conf)
        rows.append(("confidence", f"mean {mean:.3f}; >= 0.3: {sum(conf[6:]) / sum(conf):.1%}"))
    if report["copies_hist"]:
        rows.append(
            ("copies per image", ", ".join(f"{k}x: {v}" for k, v in report["copies_hist"].items()))
        )
    if report["drops"]:
        rows.append(("drops", ", ".join(f"{r}: {n}" for r, n in report["drops"].items())))
    if report["shard_faults"]:
        rows.append(
            ("damaged shards", ", ".join(f"{r}: {n}" for r, n in report["shard_faults"].items()))
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot(report: dict, class_names: list[str] | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    counts = report["class_counts"]
    labels = [
        class_names[int(c)] if class_names and int(c) < len(class_names) else c for c in counts
    ]
    axes[0, 0].bar(range(len(counts)), list(counts.values()), color="#4c72b0")
    if len(labels) <= 30:
        axes[0, 0].set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 12 else 0)
    axes[0, 0].set(
        title=f"samples per class ({report['class_source'] or 'none'})",
        xlabel="class",
        ylabel="samples",
    )
    for ax, key, title, xlabel in (
        (axes[0, 1], "confidence_hist", "top-1 confidence", "max probability"),
        (axes[1, 0], "entropy_hist", "entropy of the teacher's distribution", "entropy (nats)"),
    ):
        hist = report[key]
        edges = hist["edges"]
        ax.bar(
            edges[:-1],
            hist["counts"],
            width=np.diff(edges) if len(edges) > 1 else 0.1,
            align="edge",
            color="#55a868",
            edgecolor="white",
        )
        ax.set(title=title, xlabel=xlabel, ylabel="samples")
    copies = report["copies_hist"]
    axes[1, 1].set(title="copies per image", xlabel="copies", ylabel="images")
    if copies:
        axes[1, 1].bar([int(k) for k in copies], list(copies.values()), color="#c44e52")
        axes[1, 1].set_xticks([int(k) for k in copies])
    else:
        axes[1, 1].text(
            0.5,
            0.5,
            "only training shards hold copies",
            ha="center",
            va="center",
            transform=axes[1, 1].transAxes,
        )
    fig.suptitle(f"{report['samples']:,} samples in {report['shards']:,} shards")
    fig.tight_layout()
    with fsspec.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def run(
    spec: str, json_path: str | None = None, plot_path: str | None = None, workers: int = 2
) -> dict:
    report, class_names = collect(spec, workers)
    print(format_report(report, class_names))
    if json_path:
        write_json(json_path, report)
    if plot_path:
        plot(report, class_names, plot_path)
    return report

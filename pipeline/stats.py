"""`pipeline stats`: what is in a set of shards, as a table, JSON and a PNG.

Two ways to know, and the report says which it used:
- the stage's own record: `pipeline label` and `pipeline filter` summarise every shard they
  write into its report and add the reports up in manifest.json, so stats on their output
  folder reads one file, in seconds at any scale;
- a scan: every shard read, as a Beam job (the DirectRunner by default, any runner with the
  same options as label and filter), or a seeded `--sample` fraction of the shards for a
  quick look. Raw images, labeled shards (class histogram), pseudo-label sidecars
  (confidence, entropy, top-1 classes) and training shards (copies per image).
"""

from __future__ import annotations

import io
import random
import struct
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions
from PIL import Image

from rs_pseudolabel.data.classes import read_class_names
from rs_pseudolabel.data.decode import find_image
from rs_pseudolabel.data.errors import Drop, UsageError
from rs_pseudolabel.data.manifest import DONE, read_manifest
from rs_pseudolabel.data.read import iter_shard
from rs_pseudolabel.data.records import PSEUDO_EXT, SHARD_HEADER_KEY, decode_pseudo, read_cls
from rs_pseudolabel.data.specs import is_pattern, shard_entries
from rs_pseudolabel.data.storage import AtomicFile, absolute, join, parent, read_json, write_json
from rs_pseudolabel.pipeline.beam_options import DIRECT_RUNNERS, beam_options, run_pipeline
from rs_pseudolabel.pipeline.confidence import COARSE_BINS, coarse_edges, share_at_least
from rs_pseudolabel.pipeline.options import FilterArgs, default
from rs_pseudolabel.pipeline.reports import add_into
from rs_pseudolabel.pipeline.summaries import ENTROPY_STEP, LabelSummary

SAMPLE_SEED = 0


def _image_size(data: bytes) -> tuple[int, int] | None:
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # a stats pass describes bad images, it does not reject them
        return None


def shard_summary(url: str, size: int) -> tuple[dict, list[str]]:
    """One shard's additive counts, and the content hashes of its training samples (copies
    of one image share a hash, wherever they landed)."""
    faults: list[Drop] = []
    labels = LabelSummary()
    formats, widths, heights, classes = Counter(), Counter(), Counter(), Counter()
    samples = images = 0
    hashes = []
    for sample in iter_shard(url, faults.append):
        if sample["__key__"] == SHARD_HEADER_KEY:
            continue
        samples += 1
        found = find_image(sample)
        if found is not None:
            images += 1
            formats[found[0]] += 1
            dims = _image_size(found[1])
            if dims is not None:
                widths[str(dims[0])] += 1
                heights[str(dims[1])] += 1
        try:
            cls = read_cls(sample)
        except ValueError:
            cls = None
        if cls is not None:
            classes[str(cls)] += 1
        if PSEUDO_EXT in sample:
            try:
                label = decode_pseudo(sample["__key__"], sample[PSEUDO_EXT])
            except (ValueError, struct.error) as exc:  # counted as the filter drops it
                faults.append(Drop(url, sample["__key__"], "bad_record", str(exc)))
                continue
            labels.add(label.top1, label.confidence, label.entropy)
            if found is not None:
                hashes.append(label.content_hash.hex())
    summary = {
        "samples": samples,
        "shards": 1,
        "bytes": size,
        "images": images,
        "formats": dict(formats),
        "widths": dict(widths),
        "heights": dict(heights),
        "classes": dict(classes),
        **labels.to_json(),
        "faults": dict(Counter(d.reason for d in faults)),
    }
    return summary, hashes


def add_all(parts: Iterable[dict]) -> dict:
    total: dict = {}
    for part in parts:
        add_into(total, part)
    return total


class ScanShardFn(beam.DoFn):
    """A shard in; its summary out, and its training samples' content hashes on the side."""

    def process(self, element: tuple[str, int]) -> Iterator:
        summary, hashes = shard_summary(*element)
        yield summary
        for digest in hashes:
            yield beam.pvalue.TaggedOutput("hashes", digest)


def _save(summary: dict, copies: list[tuple[int, int]], url: str) -> None:
    write_json(url, {**summary, "copies": {str(k): n for k, n in sorted(copies)}})


def _scan(entries: list, options, result_url: str) -> dict:
    def build(p):
        scanned = (
            p
            | "ListShards" >> beam.Create([(e.url, e.size) for e in entries])
            | "SpreadShards" >> beam.Reshuffle()
            | "ScanShards" >> beam.ParDo(ScanShardFn()).with_outputs("hashes", main="summaries")
        )
        total = scanned.summaries | "AddUp" >> beam.CombineGlobally(add_all)
        copies = (
            scanned.hashes
            | "PerImage" >> beam.combiners.Count.PerElement()
            | "CopiesOf" >> beam.Map(lambda kv: kv[1])
            | "ImagesPerCopies" >> beam.combiners.Count.PerElement()
            | "Collect" >> beam.combiners.ToList()
        )
        return total | "Save" >> beam.Map(_save, beam.pvalue.AsSingleton(copies), result_url)

    run_pipeline(options, build)
    return read_json(result_url)


def _result_url(options) -> str:
    """Where the scan's workers leave the sum: a local file for the local runner, else under
    the job's --temp_location, which every worker of a remote runner can write."""
    runner = options.view_as(StandardOptions).runner
    if runner in (*DIRECT_RUNNERS, None):
        return join(tempfile.mkdtemp(prefix="pipeline-stats-"), "scan.json")
    temp = options.view_as(GoogleCloudOptions).temp_location
    if not temp:
        raise UsageError(f"a stats scan on {runner} needs --temp_location, where it leaves its sum")
    return join(temp, f"pipeline-stats-{uuid.uuid4().hex[:12]}.json")


def _median(counts: dict) -> float | None:
    if not counts:
        return None
    values = sorted((int(v), n) for v, n in counts.items())
    half, seen = sum(n for _, n in values) / 2, 0
    for i, (value, n) in enumerate(values):
        seen += n
        if seen > half:
            return float(value)
        if seen == half:
            return (value + values[i + 1][0]) / 2
    return float(values[-1][0])


def _spread(counts: dict) -> dict | None:
    if not counts:
        return None
    values = [int(v) for v in counts]
    return {"min": min(values), "median": _median(counts), "max": max(values)}


def _histograms(summary: dict) -> dict:
    entropy = {int(k): v for k, v in summary.get("entropy", {}).items()}
    top = max(entropy, default=-1) + 1
    return {
        "confidence_hist": {
            "edges": coarse_edges(),
            "counts": list(summary.get("confidence", [0] * COARSE_BINS)),
        },
        "entropy_hist": {
            "edges": [round(i * ENTROPY_STEP, 3) for i in range(top + 1)],
            "counts": [entropy.get(i, 0) for i in range(top)],
        },
    }


def _by_class(counts: dict) -> dict:
    return {str(c): counts[c] for c in sorted(counts, key=int)}


def report_from_scan(summary: dict, manifest: dict, how: str) -> dict:
    """The JSON of SPEC section 5: samples, shards, bytes, class_counts, histograms, drops."""
    classes = summary.get("classes") or {}
    top1 = summary.get("top1") or {}
    samples = summary.get("samples", 0)
    return {
        "source": how,
        "samples": samples,
        "shards": summary.get("shards", 0),
        "bytes": summary.get("bytes", 0),
        "bytes_per_sample": round(summary.get("bytes", 0) / samples, 1) if samples else None,
        "images": summary.get("images", 0),
        "formats": summary.get("formats", {}),
        "image_size": {
            "width": _spread(summary.get("widths", {})),
            "height": _spread(summary.get("heights", {})),
        },
        "class_counts": _by_class(classes or top1),
        "class_source": "cls" if classes else ("top1" if top1 else None),
        **_histograms(summary),
        "copies_hist": {
            k: summary["copies"][k] for k in sorted(summary.get("copies", {}), key=int)
        },
        "drops": manifest.get("drops", {}),
        "shard_faults": summary.get("faults", {}) | manifest.get("shard_faults", {}),
        "time_split": manifest.get("time_split") or {},
    }


def report_from_manifest(manifest: dict) -> dict:
    """What label and filter recorded of every shard they wrote, without reading one."""
    summary = dict(manifest["summary"])
    if manifest["stage"] == "filter":
        summary |= {"samples": manifest["samples_written"], "shards": manifest["output_shards"]}
        summary["classes"] = manifest["class_counts"]
    else:
        summary |= {"samples": manifest["samples_out"], "shards": manifest["shards"]}
    return report_from_scan(summary, manifest, "manifest")


def collect(
    spec: str, beam_args: list[str] | None = None, sample: float | None = None, scan: bool = False
) -> tuple[dict, list[str] | None]:
    """The report and the class names; from the stage's manifest when it has the answer."""
    folder = absolute(spec)
    manifest = read_manifest(folder) if not is_pattern(spec) else None
    names = read_class_names([join(folder, "x.tar")]) if manifest else None
    if (
        manifest
        and manifest.get("state") == DONE
        and "summary" in manifest
        and not (scan or sample)
    ):
        return report_from_manifest(manifest), names
    entries = shard_entries(spec)
    names = names or read_class_names([entries[0].url])
    how = "scan of all shards"
    if sample is not None:
        count = max(1, round(sample * len(entries)))
        entries = sorted(random.Random(SAMPLE_SEED).sample(entries, count), key=lambda e: e.url)
        how = f"scan of a {sample:g} sample: {count} of {len(shard_entries(spec))} shards"
    options = beam_options(None, beam_args or [])
    summary = _scan(entries, options, _result_url(options))
    report = report_from_scan(summary, manifest or read_manifest(parent(entries[0].url)) or {}, how)
    if manifest and manifest.get("state") != DONE:
        report["unfinished"] = manifest.get("stage", "the stage")
    return report, names


def format_report(report: dict, class_names: list[str] | None) -> str:
    def name(cls: str) -> str:
        return class_names[int(cls)] if class_names and int(cls) < len(class_names) else cls

    per_sample = report["bytes_per_sample"]
    rows = [
        ("read from", report["source"]),
        ("samples", f"{report['samples']:,}" + ("" if report["samples"] else " (no samples)")),
        ("shards", f"{report['shards']:,}"),
        ("bytes", f"{report['bytes']:,}" + (f" ({per_sample} per sample)" if per_sample else "")),
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
    conf, edges = report["confidence_hist"]["counts"], report["confidence_hist"]["edges"]
    if sum(conf):
        mids = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
        mean = sum(m * c for m, c in zip(mids, conf, strict=True)) / sum(conf)
        cut = default(FilterArgs, "threshold")  # what the filter keeps unless told
        rows.append(("confidence", f"mean {mean:.3f}; >= {cut:g}: {share_at_least(conf, cut):.1%}"))
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
    rows += time_rows(report["time_split"])
    if report.get("unfinished"):
        rows.insert(
            0,
            (
                "state",
                f"UNFINISHED: `pipeline {report['unfinished']}` has not completed this folder; "
                "these are the shards written so far (run the same command again to finish)",
            ),
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


INPUT_BOUND = 0.1  # the share of time the forward pass may wait for input before it is the story


def _device_advice(jpeg: int | None, images: int) -> str:
    """What --decode device would take of the corpus: it decodes JPEGs alone (a label job
    recorded before the count says nothing of its formats)."""
    if jpeg is None:
        return " or decode its JPEGs on it (--decode device)"
    if not jpeg:
        return "; none of its images is a JPEG, the one format --decode device takes"
    share = jpeg / max(images, 1)
    if share >= 0.99:
        return " or decode on it (--decode device)"
    return f" or decode its JPEGs on it (--decode device: {share:.0%} of the images)"


def time_rows(split: dict) -> list[tuple[str, str]]:
    """Where a label job's worker time went, and in words whether its input held it back:
    how a user sizes the CPUs a GPU needs."""
    total = split.get("seconds", 0)
    if not total:
        return []
    wait = split["input_wait_seconds"] / total
    images = split["on_device"] + split["on_cpu"]
    verdict = (
        f"input-bound: the forward pass waited for input {wait:.0%} of the time; give each "
        f"device more decode processes (cores){_device_advice(split.get('jpeg'), images)}"
        if wait >= INPUT_BOUND
        else f"not input-bound: the forward pass waited for input {wait:.0%} of the time"
    )
    return [
        (
            "worker time",
            f"{total:,.1f} s: forward {split['forward_seconds'] / total:.0%}, waiting for input "
            f"{wait:.0%}, output {split['output_seconds'] / total:.0%}",
        ),
        (
            "input side",
            f"read {split['read_seconds']:,.1f} s, decode {split['decode_seconds']:,.1f} s "
            f"({split['on_device'] / max(images, 1):.0%} of images on the device), "
            f"write {split['write_seconds']:,.1f} s",
        ),
        ("verdict", verdict),
    ]


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
    with AtomicFile(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def run(
    spec: str,
    json_path: str | None = None,
    plot_path: str | None = None,
    beam_args: list[str] | None = None,
    sample: float | None = None,
    scan: bool = False,
) -> dict:
    report, class_names = collect(spec, beam_args, sample=sample, scan=scan)
    print(format_report(report, class_names))
    if json_path:
        write_json(json_path, report)
    if plot_path:
        plot(report, class_names, plot_path)
    return report

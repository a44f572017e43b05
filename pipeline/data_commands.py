"""`pipeline data digits` and `pipeline data ingest`: corpora into shards, with manifests."""

from __future__ import annotations

from collections import Counter

from rs_pseudolabel.data.digits import write_digits
from rs_pseudolabel.data.ingest import ingest, source_entries
from rs_pseudolabel.data.manifest import StageOutput, inputs_record, write_drops
from rs_pseudolabel.data.specs import shard_entries
from rs_pseudolabel.data.storage import absolute, is_dir, join, parent


def run_digits(out: str, labeled: int, seed: int, shard_size: int, overwrite: bool = False) -> dict:
    args = {"labeled": labeled, "seed": seed, "shard_size": shard_size}
    stage = StageOutput(out, "data digits", args, overwrite=overwrite)
    done = stage.open()
    if done is not None:
        print(f"{out}: already written ({done['samples_out']} digits); nothing to do")
        return done
    counts = write_digits(stage.out_dir, labeled=labeled, seed=seed, shard_size=shard_size)
    total = sum(counts.values())
    write_drops(stage.out_dir, [])
    manifest = stage.finish(total, total, Counter(), Counter(), args, splits=counts)
    splits = ", ".join(f"{n} {split} in {join(out, split)}" for split, n in counts.items())
    print(f"wrote {total} digits: {splits}")
    return manifest


def run_ingest(src: str, out: str, shard_size: int, prefix: str, overwrite: bool = False) -> dict:
    source = absolute(src)
    entries = source_entries(source)[0] or shard_entries(source)
    args = {"src": source, "shard_size": shard_size, "prefix": prefix}
    stage = StageOutput(
        out,
        "data ingest",
        {"source": inputs_record(source, entries), "shard_size": shard_size, "prefix": prefix},
        inputs=[source if is_dir(source) else parent(entries[0].url)],
        overwrite=overwrite,
    )
    done = stage.open()
    if done is not None:
        print(f"{out}: already ingested ({done['samples_out']} samples); nothing to do")
        return done
    result = ingest(source, stage.out_dir, shard_size=shard_size, prefix=prefix)
    log = write_drops(stage.out_dir, result.drops)
    manifest = stage.finish(
        result.samples_in,
        result.samples_out,
        log.drops,
        log.shard_faults,
        args,
        source_kind=result.source_kind,
        shards=len(result.shards),
        classes=len(result.classes) if result.classes else None,
        empty_classes=result.empty_classes,
    )
    dropped = ", ".join(f"{n} {reason}" for reason, n in manifest["drops"].items())
    print(
        f"ingested {result.samples_out} of {result.samples_in} samples from {src} "
        f"({result.source_kind}) into {len(result.shards)} shards in {out}"
        + (f"; dropped {dropped}" if dropped else "")
        + (
            f"; classes with no images (ids kept): {', '.join(result.empty_classes)}"
            if result.empty_classes
            else ""
        )
    )
    return manifest

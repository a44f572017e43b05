"""`pipeline data digits` and `pipeline data ingest`: corpora into shards, with manifests."""

from __future__ import annotations

from data.digits import write_digits
from data.ingest import ingest
from data.manifest import read_manifest, write_report
from data.write import join


def run_digits(out: str, labeled: int, seed: int, shard_size: int) -> None:
    args = {"labeled": labeled, "seed": seed, "shard_size": shard_size}
    done = read_manifest(out)
    if done is not None and done.get("args") == args:
        print(f"{out}: already written ({done['samples_out']} digits); nothing to do")
        return
    counts = write_digits(out, labeled=labeled, seed=seed, shard_size=shard_size)
    total = sum(counts.values())
    write_report(out, "data digits", args, total, total, [], splits=counts)
    splits = ", ".join(f"{n} {split} in {join(out, split)}" for split, n in counts.items())
    print(f"wrote {total} digits: {splits}")


def run_ingest(src: str, out: str, shard_size: int, prefix: str) -> None:
    result = ingest(src, out, shard_size=shard_size, prefix=prefix)
    args = {"src": src, "shard_size": shard_size, "prefix": prefix}
    manifest = write_report(
        out,
        "data ingest",
        args,
        result.samples_in,
        result.samples_out,
        result.drops,
        source_kind=result.source_kind,
        shards=len(result.shards),
        classes=len(result.classes) if result.classes else None,
    )
    print(
        f"ingested {result.samples_out} of {result.samples_in} samples from {src} "
        f"({result.source_kind}) into {len(result.shards)} shards in {out}; "
        f"dropped {manifest['dropped']} {manifest['drops'] or ''}".rstrip()
    )

"""What the tests and the benchmarks build their inputs with and hold outputs to."""

from __future__ import annotations

from collections.abc import Iterable

from rs_pseudolabel.data.write import AtomicShard


def write_shard(url: str, samples: Iterable[dict]) -> int:
    """Write one whole shard atomically; returns the number of samples written."""
    with AtomicShard(url) as shard:
        for sample in samples:
            shard.write(sample)
    return shard.count


# What `--json` always holds (SPEC section 5), whichever way the answer was found.
SPEC_KEYS = (
    "samples",
    "shards",
    "bytes",
    "class_counts",
    "confidence_hist",
    "entropy_hist",
    "copies_hist",
    "drops",
)

"""Drop records: every sample a stage does not write is accounted for with a reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Drop:
    """One dropped sample (or, with key None, a part of a shard that could not be read)."""

    shard: str
    key: str | None
    reason: str
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)

"""Record codecs (SPEC section 5): labeled samples, pseudo-labels, training samples.

A pseudo-label costs one tar member per sample (one 512-byte header): all its fields are
packed into a single little-endian binary value. Fields that are the same for a whole
sidecar shard (the teacher's id, the source shard) are stored once, in the shard's
`__shard__.json` member, and given back with every record by `read_pseudo_shard`. Training
shards have no such member: every sample in them is an image with its class, as any
WebDataset reader expects.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from rs_pseudolabel.data.errors import Drop
from rs_pseudolabel.data.read import iter_shard

PSEUDO_EXT = "pl"
MAX_TOPK = 255  # classes one record holds: k is one byte
SHARD_HEADER_KEY = "__shard__"
FORMAT_VERSION = 1
_WIDE_INDICES = 1  # flag: class indices stored as uint32 (more than 65,535 classes)
_HAS_EMBEDDING = 2  # flag: a float16 embedding follows the top-k
_HEAD = struct.Struct("<BBB8s2e")  # version, flags, k, content hash, confidence, entropy


def content_hash(image: bytes) -> bytes:
    """Eight bytes of BLAKE2b: enough to find exact copies among billions of images."""
    return hashlib.blake2b(image, digest_size=8).digest()


@dataclass(kw_only=True)
class PseudoLabel:
    """A teacher's soft label for one sample (built by keyword: its fields are many and of
    like types)."""

    key: str
    indices: np.ndarray  # top-k class indices, most probable first
    probs: np.ndarray  # their probabilities, float16
    confidence: float  # max probability over the full distribution
    entropy: float  # entropy of the full distribution, in nats
    content_hash: bytes
    embedding: np.ndarray | None = None  # float16, L2-normalised
    teacher: str = ""
    source: str = ""

    @property
    def top1(self) -> int:
        return int(self.indices[0])


def encode_pseudo(label: PseudoLabel) -> bytes:
    wide = bool(label.indices.size) and int(label.indices.max()) > 0xFFFF
    flags = (_WIDE_INDICES if wide else 0) | (_HAS_EMBEDDING if label.embedding is not None else 0)
    k = len(label.indices)
    if k > MAX_TOPK:  # the launcher refuses a larger --topk: here it is a bug
        raise ValueError(f"top-k is limited to {MAX_TOPK} classes")
    parts = [
        _HEAD.pack(FORMAT_VERSION, flags, k, label.content_hash, label.confidence, label.entropy),
        label.indices.astype("<u4" if wide else "<u2").tobytes(),
        label.probs.astype("<f2").tobytes(),
    ]
    if label.embedding is not None:
        emb = label.embedding.astype("<f2")
        parts += [struct.pack("<H", emb.size), emb.tobytes()]
    return b"".join(parts)


def decode_pseudo(key: str, payload: bytes, teacher: str = "", source: str = "") -> PseudoLabel:
    version, flags, k, digest, confidence, entropy = _HEAD.unpack_from(payload)
    if version != FORMAT_VERSION:
        raise ValueError(f"pseudo-label format {version} is not {FORMAT_VERSION}")
    offset = _HEAD.size
    index_type = np.dtype("<u4" if flags & _WIDE_INDICES else "<u2")
    indices = np.frombuffer(payload, index_type, k, offset).astype(np.int64)
    offset += k * index_type.itemsize
    probs = np.frombuffer(payload, "<f2", k, offset).astype(np.float16)
    offset += 2 * k
    embedding = None
    if flags & _HAS_EMBEDDING:
        (dim,) = struct.unpack_from("<H", payload, offset)
        embedding = np.frombuffer(payload, "<f2", dim, offset + 2).astype(np.float16)
    return PseudoLabel(
        key=key,
        indices=indices,
        probs=probs,
        confidence=float(confidence),
        entropy=float(entropy),
        content_hash=digest,
        embedding=embedding,
        teacher=teacher,
        source=source,
    )


def shard_header(**fields: object) -> dict:
    """The first member of a sidecar shard: what is the same for all its records."""
    return {"__key__": SHARD_HEADER_KEY, "json": json.dumps(fields, sort_keys=True).encode()}


def pseudo_sample(label: PseudoLabel) -> dict:
    return {"__key__": label.key, PSEUDO_EXT: encode_pseudo(label)}


def labeled_sample(key: str, ext: str, image: bytes, cls: int | None) -> dict:
    """A labeled (or, with cls None, unlabeled) image sample in the common WebDataset layout."""
    sample = {"__key__": key, ext: image}
    if cls is not None:
        sample["cls"] = str(int(cls)).encode()
    return sample


def read_cls(sample: dict) -> int | None:
    """The class index of a sample: `.cls` as written by us and ImageNet shards, or None.

    Raises ValueError for a present but malformed value, so callers can drop it with a reason.
    """
    raw = sample.get("cls")
    if raw is None:
        return None
    value = int(raw.decode("ascii").strip())
    if value < 0:
        raise ValueError(f"negative class id {value}")
    return value


def read_header(sample: dict) -> dict | None:
    if sample.get("__key__") != SHARD_HEADER_KEY:
        return None
    return json.loads(sample["json"])


def read_pseudo_shard(url: str, on_error) -> Iterator[PseudoLabel]:
    """The records of one sidecar shard, with the shard-wide fields filled in. A damaged
    record (cut short, an unknown format) goes to `on_error` as a `bad_record` drop naming
    the sidecar and the key, so one bad record costs its sample, not the job."""
    header: dict = {}
    for sample in iter_shard(url, on_error):
        try:
            found = read_header(sample)
        except ValueError as exc:  # a damaged header: the records after it lose nothing
            on_error(Drop(url, None, "bad_record", f"__shard__.json: {exc}"))
            continue
        if found is not None:
            header = found
        elif PSEUDO_EXT in sample:
            try:
                label = decode_pseudo(
                    sample["__key__"],
                    sample[PSEUDO_EXT],
                    header.get("teacher", ""),
                    header.get("source", ""),
                )
            except (ValueError, struct.error) as exc:
                on_error(Drop(url, sample["__key__"], "bad_record", str(exc)))
                continue
            yield label

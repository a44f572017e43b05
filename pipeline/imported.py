"""Labels made elsewhere (`pipeline label --from-predictions FILE`): another system's teacher
outputs joined to the corpus shards by key, written as the same sidecars and manifest a
teacher of ours writes, so filter and train-student take them unchanged.

The format, one row per image, as JSON lines (`.jsonl`) or Parquet (`.parquet`) columns:

- `key`: the sample's key in the corpus shards (WebDataset's `__key__`);
- its prediction, one of: `probs` (every class's probability), `logits` (every class's
  logit; softmax here), or `topk_indices` with `topk_probs` (the most probable classes,
  most probable first);
- optional `entropy` (nats over all classes; default: computed from what is given, the mass
  of the classes not given counted as one more outcome, a lower bound); the confidence is
  the first probability, as with a teacher;
- optional `sha256`: the hex SHA-256 of the image's bytes as stored in the shard; an image
  whose bytes do not match is dropped as `hash_mismatch`.

Every corpus image is accounted for as with a teacher: labeled, or dropped with its reason
(`no_prediction` where the file has no row for its key, and the teacher's reasons:
undecodable images are dropped, as a model could not have seen them). Rows whose key is in
no shard are counted and the first of them listed in the manifest. The whole file is read
into memory by the launcher and by each worker: at the scale of millions of rows, split the
corpus and its predictions into jobs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from rs_pseudolabel.data.decode import EvalCrop
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.storage import open_read, read_bytes
from rs_pseudolabel.pipeline.label_decode import make_decoder
from rs_pseudolabel.pipeline.label_shard import Batch, Labels

FORMATS = (".jsonl", ".parquet")
PREDICTION_KINDS = ("probs", "logits", "topk_indices")
PROBE_CROP = EvalCrop(8, 8, "bilinear")  # decoded only to drop what no model could see
LISTED = 20  # unmatched keys named in the manifest


@dataclass(frozen=True)
class Prediction:
    indices: np.ndarray  # int64, most probable first
    probs: np.ndarray  # float32
    entropy: float
    sha256: bytes | None


def predictions_id(path: str) -> str:
    """The labels' id in manifests and records, as a teacher's: changes with the file."""
    return f"predictions@{hashlib.sha256(read_bytes(path)).hexdigest()[:8]}"


def _rows(path: str):
    """(where, row) for each row of the file, `where` naming it in a message."""
    if not path.endswith(FORMATS):
        raise UsageError(f"--from-predictions {path}: the file must be .jsonl or .parquet")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            with open_read(path) as f:
                table = pq.read_table(f)
            for i, row in enumerate(table.to_pylist()):
                yield f"{path} row {i + 1}", row
            return
        with open_read(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    where = f"{path} line {i + 1}"
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UsageError(f"{where} is not JSON: {exc.msg}") from None
    except FileNotFoundError:
        raise UsageError(f"--from-predictions {path}: file not found") from None


def _numbers(where: str, row: dict, name: str) -> np.ndarray:
    values = row.get(name)
    if (
        not isinstance(values, list)
        or not values
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
    ):
        raise UsageError(f"{where}: {name!r} must be a non-empty list of finite numbers")
    return np.asarray(values, dtype=np.float64)


def _prediction(where: str, row: dict, topk: int) -> Prediction:
    """One row checked and brought to what a record holds: the top `topk` classes."""
    kinds = [kind for kind in PREDICTION_KINDS if row.get(kind) is not None]
    if len(kinds) != 1:
        raise UsageError(
            f"{where}: give exactly one of probs, logits, or topk_indices with topk_probs "
            f"(found {', '.join(kinds) or 'none'})"
        )
    if kinds[0] == "topk_indices":
        raw = _numbers(where, row, "topk_indices")
        probs = _numbers(where, row, "topk_probs")
        if len(raw) != len(probs) or (raw < 0).any() or (raw != raw.round()).any():
            raise UsageError(
                f"{where}: topk_indices must be as many whole numbers >= 0 as topk_probs"
            )
        indices = raw.astype(np.int64)
        rest = 1.0 - probs.sum()
        if len(set(indices.tolist())) != len(indices):
            raise UsageError(f"{where}: topk_indices names a class twice")
    else:
        values = _numbers(where, row, kinds[0])
        if kinds[0] == "logits":
            values = np.exp(values - values.max())
            values /= values.sum()
        elif abs(values.sum() - 1) > 1e-2:
            raise UsageError(f"{where}: probs sum to {values.sum():.4f}, not 1")
        order = np.argsort(-values, kind="stable")
        indices, probs, rest = order, values[order], 0.0
    if (probs < 0).any() or (probs > 1 + 1e-6).any() or rest < -1e-2:
        raise UsageError(f"{where}: probabilities must lie in [0, 1] and sum to at most 1")
    if (np.diff(probs) > 1e-6).any():
        raise UsageError(f"{where}: topk_probs must be in decreasing order")
    spread = probs[probs > 0]
    entropy = float(-(spread * np.log(spread)).sum()) + (
        float(-rest * math.log(rest)) if rest > 1e-9 else 0.0
    )
    entropy = float(row["entropy"]) if row.get("entropy") is not None else entropy
    digest = row.get("sha256")
    if digest is not None:
        try:
            digest = bytes.fromhex(digest)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: sha256 must be 64 hex digits") from None
    return Prediction(indices[:topk], probs[:topk].astype(np.float32), entropy, digest)


def read_predictions(path: str, topk: int) -> dict[str, Prediction]:
    """Every row by key; a file naming a key twice, or a row that is not a prediction, is
    refused in one line naming the row."""
    found: dict[str, Prediction] = {}
    for where, row in _rows(path):
        key = row.get("key") if isinstance(row, dict) else None
        if not isinstance(key, str) or not key:
            raise UsageError(f"{where}: every row needs a 'key' (the sample's __key__)")
        if key in found:
            raise UsageError(f"{where}: key {key!r} has a prediction already")
        found[key] = _prediction(where, row, topk)
    if not found:
        raise UsageError(f"--from-predictions {path} holds no rows")
    return found


def common_topk(predictions: dict[str, Prediction], topk: int) -> int:
    """The classes every record keeps: --topk, or fewer where rows give fewer."""
    return min(topk, min(len(p.indices) for p in predictions.values()))


class ImportedLabels:
    """What `label_shard` drives, in place of a teacher: images are admitted only with a
    prediction (and matching bytes), decoded only to drop what no model could have seen, and
    "labeled" from the file."""

    def __init__(self, path: str, topk: int, processes: int, teacher_id: str) -> None:
        self.predictions = read_predictions(path, topk)
        self.topk = common_topk(self.predictions, topk)
        self.teacher_id = teacher_id
        self.device = torch.device("cpu")
        self.decoder = make_decoder(PROBE_CROP, "cpu", "cpu", processes)

    def admit(self, key: str, image: bytes) -> str | None:
        prediction = self.predictions.get(key)
        if prediction is None:
            return "no_prediction"
        if prediction.sha256 is not None and hashlib.sha256(image).digest() != prediction.sha256:
            return "hash_mismatch"
        return None

    def prepare(self, keys: list[str], hashes: list[bytes], pixels: torch.Tensor) -> Batch:
        return Batch(keys, hashes, pixels, None)

    def label(self, batch: Batch, k: int, embed: bool) -> Labels:
        rows = [self.predictions[key] for key in batch.keys]
        k = min(k, self.topk)
        parts = [
            torch.from_numpy(np.stack([p.indices[:k] for p in rows])),
            torch.from_numpy(np.stack([p.probs[:k] for p in rows])),
            torch.tensor([p.entropy for p in rows], dtype=torch.float32),
        ]
        return Labels(batch.keys, batch.hashes, parts, None)

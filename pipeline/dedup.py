"""Near-duplicates of evaluation images: exact copies by content hash, near copies by faiss.

The evaluation set is labeled by the same teacher with `--embed`, so its embeddings live in
the same space as the corpus's. Both sides are centred on the evaluation set's mean before
the cosine: pooled ReLU features share a large common direction that would otherwise make
every pair of images look alike.

How alike is "a copy" depends on the teacher, so by default the threshold is calibrated on
the evaluation set itself: each evaluation image's nearest *other* evaluation image is a
distinct image, and the similarity of a distinct corpus image to its nearest evaluation
image follows the same law. The (1 - fpr) quantile of those similarities therefore drops
about a fraction `fpr` of distinct images, whatever the teacher's embedding looks like.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from data.read import iter_samples
from data.records import PSEUDO_EXT, decode_pseudo
from data.specs import expand_shards

FALLBACK_THRESHOLD = 0.95  # one evaluation image: nothing to calibrate on


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def calibrated_threshold(index: faiss.IndexFlatIP, fpr: float) -> float:
    """The (1 - fpr) quantile of nearest-other-neighbour cosines within the evaluation set."""
    if index.ntotal < 2:
        return FALLBACK_THRESHOLD
    vectors = index.reconstruct_n(0, index.ntotal)
    sims, _ = index.search(vectors, 2)
    # Column 0 is the image itself, unless an exact twin ties with it: either way column 1 is
    # the nearest other image.
    return float(np.quantile(sims[:, 1], 1 - fpr, method="higher"))


@dataclass
class EvalIndex:
    keys: list[str]
    by_hash: dict[bytes, str]
    index: faiss.IndexFlatIP
    threshold: float
    center: np.ndarray

    @classmethod
    def from_sidecars(cls, spec: str, threshold: float | None, fpr: float = 0.005) -> EvalIndex:
        """`threshold=None` calibrates it for a false-drop rate `fpr` (see the module note)."""
        keys, hashes, vectors = [], {}, []
        for sample in iter_samples(expand_shards(spec), lambda d: None):
            if PSEUDO_EXT not in sample:
                continue
            label = decode_pseudo(sample["__key__"], sample[PSEUDO_EXT])
            keys.append(label.key)
            hashes.setdefault(label.content_hash, label.key)
            vectors.append(label.embedding.astype(np.float32))
        matrix = np.stack(vectors) if vectors else np.zeros((0, 1), np.float32)
        center = matrix.mean(axis=0) if vectors else np.zeros(1, np.float32)
        index = faiss.IndexFlatIP(matrix.shape[1])
        if vectors:
            index.add(np.ascontiguousarray(_unit(matrix - center), np.float32))
        if threshold is None:
            threshold = calibrated_threshold(index, fpr)
        return cls(keys, hashes, index, threshold, center)

    def matches(
        self, hashes: list[bytes], embeddings: np.ndarray | None
    ) -> list[tuple[str, str] | None]:
        """For each sample: (reason, evaluation key) if it copies an evaluation image, else None."""
        found: list[tuple[str, str] | None] = [
            ("eval_duplicate_exact", self.by_hash[h]) if h in self.by_hash else None for h in hashes
        ]
        if embeddings is not None and self.index.ntotal and len(hashes):
            queries = _unit(np.asarray(embeddings, np.float32) - self.center)
            sims, ids = self.index.search(np.ascontiguousarray(queries, np.float32), 1)
            for i, (sim, j) in enumerate(zip(sims[:, 0], ids[:, 0], strict=True)):
                if found[i] is None and sim >= self.threshold:
                    found[i] = ("eval_duplicate_near", self.keys[j])
        return found

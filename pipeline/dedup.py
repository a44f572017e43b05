"""Near-duplicates of evaluation images: exact copies by content hash, near copies by faiss.

The evaluation set is labeled by the same teacher with `--embed`, so its embeddings live in
the same space as the corpus's. Both sides are centred on the evaluation set's mean before
the cosine: pooled ReLU features share a large common direction that would otherwise make
every pair of images look alike.

How alike is "a copy" depends on the teacher, so by default the threshold is calibrated on
the evaluation set itself: each evaluation image's nearest *distinct* evaluation image is a
distinct image, and the similarity of a distinct corpus image to its nearest evaluation
image follows the same law. The (1 - fpr) quantile of those similarities therefore drops
about a fraction `fpr` of distinct images, whatever the teacher's embedding looks like.

Evaluation sets hold near-copies of their own (ImageNet's validation set does). Taken as
"nearest other image", a handful of such pairs would fill the top quantile and lift the
threshold above every real copy. So each image's near-copies are set aside first, by a
ratio test on the same index (Lowe's, generalised to small groups): a neighbour is a
near-copy when its cosine distance is under `NEAR_COPY_RATIO` times the distance to the
image's `NEIGHBOURS`-th nearest other image. A distinct neighbour sits about as far as the
crowd behind it; a copy sits far closer. What is left is each image's nearest distinct
image.

The quantile itself is read from the tail above the 90th percentile, fitted with an
exponential (peaks over threshold), rather than from the few values above the (1 - fpr)
point: at fpr 0.005 and 1,000 evaluation images those are five, and where they fall moves
the false-drop rate by a factor of two from one evaluation set to the next. Cosines are
bounded, so the real tail is lighter than the exponential, and the fit errs towards
dropping fewer distinct images. `bench/bench_dedup.py` measures both kinds of error.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import PSEUDO_EXT, decode_pseudo
from rs_pseudolabel.data.specs import expand_shards

FALLBACK_THRESHOLD = 0.95  # one evaluation image: nothing to calibrate on
NEIGHBOURS = 8  # the crowd an image's nearest neighbours are compared with
NEAR_COPY_RATIO = 0.4  # much closer than the crowd: a copy, not a distinct image
TAIL = 0.1  # the share of the law the exponential is fitted to
MIN_TAIL = 10  # fewer values above the tail's start: read the quantile directly


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def nearest_distinct(index: faiss.IndexFlatIP) -> tuple[np.ndarray, np.ndarray]:
    """Per evaluation image, the cosine to its nearest other image that is not one of its
    near-copies, and whether a near-copy was set aside for it (see the module note)."""
    n = index.ntotal
    k = min(NEIGHBOURS, n - 1)
    sims, ids = index.search(index.reconstruct_n(0, n), k + 1)
    # Drop the image itself from its own row (an exact twin may tie with it, so it is not
    # always column 0); a row where it fell off the end loses its last column instead.
    own = ids == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    others = sims[~own].reshape(n, k)
    distance = 1.0 - others
    copies = distance < NEAR_COPY_RATIO * distance[:, -1:]  # never the last column itself
    first = copies.argmin(axis=1)  # the first neighbour that is not a copy
    return others[np.arange(n), first], copies[:, 0]


def tail_quantile(values: np.ndarray, fpr: float) -> float:
    """The (1 - fpr) quantile of `values`, from an exponential fitted to their top TAIL
    (P(v > u + y) = TAIL * exp(-y / mean excess)); read directly when fpr is not in that
    tail or too few values are."""
    if fpr >= TAIL or len(values) * TAIL < MIN_TAIL:
        return float(np.quantile(values, 1 - fpr, method="higher"))
    start = float(np.quantile(values, 1 - TAIL))
    excess = values[values > start] - start
    return min(1.0, start + float(excess.mean()) * float(np.log(TAIL / fpr)))


def calibrated_threshold(index: faiss.IndexFlatIP, fpr: float) -> float:
    """The (1 - fpr) quantile of nearest-distinct-image cosines within the evaluation set."""
    if index.ntotal < 2:
        return FALLBACK_THRESHOLD
    sims, _ = nearest_distinct(index)
    return tail_quantile(sims, fpr)


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
        keys, hashes, vectors = [], [], []
        for sample in iter_samples(expand_shards(spec), lambda d: None):
            if PSEUDO_EXT not in sample:
                continue
            label = decode_pseudo(sample["__key__"], sample[PSEUDO_EXT])
            keys.append(label.key)
            hashes.append(label.content_hash)
            vectors.append(label.embedding.astype(np.float32))
        matrix = np.stack(vectors) if vectors else np.zeros((0, 1), np.float32)
        return cls.from_arrays(keys, hashes, matrix, threshold, fpr)

    @classmethod
    def from_arrays(
        cls,
        keys: list[str],
        hashes: list[bytes],
        embeddings: np.ndarray,
        threshold: float | None,
        fpr: float = 0.005,
    ) -> EvalIndex:
        """The index over evaluation images given as keys, content hashes and embeddings."""
        by_hash: dict[bytes, str] = {}
        for key, digest in zip(keys, hashes, strict=True):
            by_hash.setdefault(digest, key)
        matrix = np.asarray(embeddings, np.float32)
        center = matrix.mean(axis=0) if len(keys) else np.zeros(matrix.shape[1], np.float32)
        index = faiss.IndexFlatIP(matrix.shape[1])
        if len(keys):
            index.add(np.ascontiguousarray(_unit(matrix - center), np.float32))
        if threshold is None:
            threshold = calibrated_threshold(index, fpr)
        return cls(list(keys), by_hash, index, threshold, center)

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

"""The selection rules of `pipeline filter`, as pure functions over confidence histograms.

Noisy Student (Xie et al. 2020): per class, the highest threshold t_c >= threshold at which
at least N images remain; kept images get r_c = N / count_c expected copies. Yalniz et al.
(2019): each image is ranked under its top-P classes and the K most confident per class
are kept. Histograms of 1,000 bins per class are all either rule needs, so memory does not
grow with the corpus.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from data.storage import read_bytes, write_bytes

BINS = 1000


# Per-class confidence counts `pipeline label` leaves beside its sidecars: the filter's
# first pass, already counted while labeling.
CLASS_CONFIDENCES = "class_confidences.npy"


def conf_bins(confidence: np.ndarray) -> np.ndarray:
    """The histogram bin of each confidence (NaN and below 0 in the first bin)."""
    scaled = np.nan_to_num(np.asarray(confidence, np.float64) * BINS, nan=0.0)
    return np.clip(scaled, 0, BINS - 1).astype(np.int64)


def conf_bin(confidence: float) -> int:
    """`conf_bins` of one number, in plain Python: the filter asks it of every record."""
    confidence = float(confidence)
    if not confidence > 0:  # NaN too
        return 0
    return min(int(confidence * BINS), BINS - 1)


def sparse_to_json(hists: Mapping[int, Mapping[int, int]]) -> dict[str, dict[str, int]]:
    """Sparse histograms {class: {bin: count}} with JSON's string keys, classes in order."""
    return {str(c): {str(b): n for b, n in bins.items()} for c, bins in sorted(hists.items())}


def sparse_from_json(value: Mapping[str, Mapping[str, int]]) -> dict[int, dict[int, int]]:
    return {int(c): {int(b): n for b, n in bins.items()} for c, bins in value.items()}


def unit_draw(key: str, salt: str = "") -> float:
    """A uniform number in [0, 1) fixed by the sample key: reruns draw the same."""
    digest = hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass(frozen=True)
class ClassRule:
    """What to keep of one class: bins at or above `min_bin` in full, the bin just below it
    with probability `edge_keep`, each kept image `rate` times in expectation."""

    min_bin: int
    rate: float
    edge_keep: float = 0.0

    def keeps(self, bin_index: int, key: str) -> bool:
        if bin_index >= self.min_bin:
            return True
        return bin_index == self.min_bin - 1 and unit_draw(key, "edge") < self.edge_keep

    def copies(self, key: str) -> int:
        whole = math.floor(self.rate)
        return whole + (unit_draw(key, "copies") < self.rate - whole)


Histograms = Mapping[int, np.ndarray]  # class -> counts per confidence bin (BINS of them)


def save_histograms(url: str, sparse: Mapping[int, Mapping[int, int]]) -> None:
    """Sparse {class: {bin: count}} maps saved as one [classes, BINS] array (.npy): its size
    is set by the classes, never by the records, and reading it back makes no Python object
    per bin."""
    table = np.zeros((max(sparse, default=-1) + 1, BINS), np.int64)
    for cls, counts in sparse.items():
        bins = np.fromiter(counts.keys(), np.int64, len(counts))
        table[cls, bins] = np.fromiter(counts.values(), np.int64, len(counts))
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    write_bytes(url, buffer.getvalue())


def load_histograms(url: str) -> dict[int, np.ndarray] | None:
    """The per-class histograms `save_histograms` wrote (classes with no count left out), or
    None when there is no such file."""
    try:
        table = np.load(io.BytesIO(read_bytes(url)), allow_pickle=False)
    except FileNotFoundError:
        return None
    return {int(c): table[c] for c in np.flatnonzero(table.sum(axis=1))}


def _above(counts: np.ndarray) -> np.ndarray:
    """Images with confidence in each bin or higher."""
    return np.cumsum(counts[::-1])[::-1]


def threshold_rules(
    hist: Histograms, threshold: float, per_class: int, max_copies: float = math.inf
) -> dict[int, ClassRule]:
    """Noisy Student's rule: t_c is `threshold` or a 0.01 step above it, the highest that
    leaves at least `per_class` images; a class with fewer keeps all above `threshold`,
    each image at most `max_copies` times."""
    start = math.ceil(threshold * BINS - 1e-9)
    if start >= BINS:
        return {}
    steps = [start] + [b for b in range(0, BINS, BINS // 100) if b > start]
    rules = {}
    for cls, counts in hist.items():
        above = _above(counts)
        if above[start] == 0:
            continue
        enough = [b for b in steps if above[b] >= per_class]
        min_bin = enough[-1] if enough else start
        rate = min(per_class / int(above[min_bin]), max_copies)
        rules[cls] = ClassRule(min_bin=min_bin, rate=rate)
    return rules


def capped_classes(hist: Histograms, rules: Mapping[int, ClassRule], per_class: int) -> list[int]:
    """Classes whose rate the copy cap lowered: too few images to reach `per_class`."""
    return [
        cls
        for cls, rule in rules.items()
        if rule.rate < per_class / int(_above(hist[cls])[rule.min_bin])
    ]


def expected_copies(hist: Histograms, rules: Mapping[int, ClassRule]) -> float:
    """Training samples the rules make, in expectation: what sizes the output shards."""
    total = 0.0
    for cls, rule in rules.items():
        above = _above(hist[cls])
        kept = above[rule.min_bin] if rule.min_bin < BINS else 0
        if rule.min_bin > 0:
            kept += rule.edge_keep * hist[cls][rule.min_bin - 1]
        total += rule.rate * float(kept)
    return total


def topk_rules(hist: Histograms, per_class: int) -> dict[int, ClassRule]:
    """Yalniz et al.: the K most confident per class, ties at the cut broken by the key."""
    rules = {}
    for cls, counts in hist.items():
        if counts.sum() == 0:
            continue
        above = _above(counts)
        full = np.nonzero(above <= per_class)[0]
        min_bin = int(full[0]) if full.size else BINS
        taken = int(above[min_bin]) if min_bin < BINS else 0
        edge = int(counts[min_bin - 1]) if min_bin > 0 else 0
        keep = min(1.0, (per_class - taken) / edge) if edge else 0.0
        rules[cls] = ClassRule(min_bin=min_bin, rate=1.0, edge_keep=keep)
    return rules

"""The selection rules of `pipeline filter`, as pure functions over confidence histograms.

Noisy Student (Xie et al. 2020): per class, the highest threshold t_c >= threshold at which
at least N images remain; kept images get r_c = N / count_c expected copies. Yalniz et al.
(2019): each image is ranked under its top-P classes and the K most confident per class
are kept. Histograms of 1,000 bins per class are all either rule needs, so memory does not
grow with the corpus.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

BINS = 1000


def conf_bin(confidence: float | np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(confidence, np.float64) * BINS).astype(np.int64), 0, BINS - 1)


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


def threshold_rules(hist: np.ndarray, threshold: float, per_class: int) -> dict[int, ClassRule]:
    """Noisy Student's rule: t_c is `threshold` or a 0.01 step above it, the highest that
    leaves at least `per_class` images; a class with fewer keeps all above `threshold`."""
    start = math.ceil(threshold * BINS - 1e-9)
    if start >= BINS:
        return {}
    steps = [start] + [b for b in range(0, BINS, BINS // 100) if b > start]
    rules = {}
    for cls, counts in enumerate(hist):
        above = np.cumsum(counts[::-1])[::-1]  # images with confidence in this bin or higher
        if above[start] == 0:
            continue
        enough = [b for b in steps if above[b] >= per_class]
        min_bin = enough[-1] if enough else start
        rules[cls] = ClassRule(min_bin=min_bin, rate=per_class / int(above[min_bin]))
    return rules


def topk_rules(hist: np.ndarray, per_class: int) -> dict[int, ClassRule]:
    """Yalniz et al.: the K most confident per class, ties at the cut broken by the key."""
    rules = {}
    for cls, counts in enumerate(hist):
        if counts.sum() == 0:
            continue
        above = np.cumsum(counts[::-1])[::-1]
        full = np.nonzero(above <= per_class)[0]
        min_bin = int(full[0]) if full.size else BINS
        taken = int(above[min_bin]) if min_bin < BINS else 0
        edge = int(counts[min_bin - 1]) if min_bin > 0 else 0
        keep = min(1.0, (per_class - taken) / edge) if edge else 0.0
        rules[cls] = ClassRule(min_bin=min_bin, rate=1.0, edge_keep=keep)
    return rules

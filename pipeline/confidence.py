"""Confidence histograms, one binning for every stage: label counts them per class while it
labels, filter draws its per-class rules from them, stats shows them. BINS fine bins over
[0, 1]; the coarse view stats and the reports hold is every COARSE_STEP of them, so a count
in one is the sum of the counts in the other. Histograms of BINS bins per class are all the
rules need, so memory does not grow with the corpus.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from rs_pseudolabel.data.storage import read_bytes, write_bytes

BINS = 1000
COARSE_STEP = 50  # fine bins per coarse bin: 20 bins of 0.05
COARSE_BINS = BINS // COARSE_STEP

# Per-class confidence counts `pipeline label` leaves beside its sidecars: the filter's
# first pass, already counted while labeling.
CLASS_CONFIDENCES = "class_confidences.npy"

Histograms = Mapping[int, np.ndarray]  # class -> counts per confidence bin (BINS of them)


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


def bin_floor(bin_index: int) -> float:
    """The lowest confidence a bin holds."""
    return bin_index / BINS


def coarse_bin(confidence: float) -> int:
    """The coarse bin of one confidence: its fine bin's."""
    return conf_bin(confidence) // COARSE_STEP


def coarse_edges() -> list[float]:
    return [round(bin_floor(i * COARSE_STEP), 3) for i in range(COARSE_BINS + 1)]


def share_at_least(coarse: Sequence[int], confidence: float) -> float:
    """The share of a coarse histogram at or above `confidence` (a coarse edge)."""
    total = sum(coarse)
    return sum(coarse[coarse_bin(confidence) :]) / total if total else 0.0


def sparse_to_json(hists: Mapping[int, Mapping[int, int]]) -> dict[str, dict[str, int]]:
    """Sparse histograms {class: {bin: count}} with JSON's string keys, classes in order."""
    return {str(c): {str(b): n for b, n in bins.items()} for c, bins in sorted(hists.items())}


def sparse_from_json(value: Mapping[str, Mapping[str, int]]) -> dict[int, dict[int, int]]:
    return {int(c): {int(b): n for b, n in bins.items()} for c, bins in value.items()}


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

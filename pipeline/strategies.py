"""The selection strategies of `pipeline filter`, each one class behind one interface: the
classes an image is ranked under, the per-class rules drawn from their confidence
histograms, the decision on one pseudo-label, and the label its training samples carry.
The filter picks one by `--strategy` and asks it, never the strategy's name.

Noisy Student (Xie et al. 2020): per class, the highest threshold t_c >= threshold at which
at least N images remain; kept images get r_c = N / count_c expected copies (or, balanced by
`sample`, t_c stays at the threshold and a class's N are drawn from all above it). Yalniz et al.
(2019): each image is ranked under its top-P classes and the K most confident per class
are kept.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from rs_pseudolabel.data.records import PseudoLabel
from rs_pseudolabel.pipeline.confidence import BINS, Histograms, bin_floor, conf_bin

# How a class with more than its quota above the threshold is cut: its most confident, or a
# draw from all above the threshold
BALANCES = ("top", "sample")


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


Rules = Mapping[int, ClassRule]


def _above(counts: np.ndarray) -> np.ndarray:
    """Images with confidence in each bin or higher."""
    return np.cumsum(counts[::-1])[::-1]


def expected_copies(hist: Histograms, rules: Rules) -> float:
    """Training samples the rules make, in expectation: what sizes the output shards."""
    total = 0.0
    for cls, rule in rules.items():
        above = _above(hist[cls])
        kept = above[rule.min_bin] if rule.min_bin < BINS else 0
        if rule.min_bin > 0:
            kept += rule.edge_keep * hist[cls][rule.min_bin - 1]
        total += rule.rate * float(kept)
    return total


def one_hot(label: PseudoLabel, cls: int) -> PseudoLabel:
    return PseudoLabel(
        key=label.key,
        indices=np.array([cls]),
        probs=np.array([1.0], np.float16),
        confidence=1.0,
        entropy=0.0,
        content_hash=label.content_hash,
    )


def soft(label: PseudoLabel) -> PseudoLabel:
    """The label as a training sample carries it: no embedding, no teacher, no source."""
    return PseudoLabel(
        key=label.key,
        indices=label.indices,
        probs=label.probs,
        confidence=label.confidence,
        entropy=label.entropy,
        content_hash=label.content_hash,
    )


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """A filter's way of choosing. Its fields are the filter options it reads, by their
    names (what it is built from, and which options another strategy refuses); small enough
    to pickle into the job graph."""

    name: ClassVar[str]

    def ranked(self, label: PseudoLabel) -> list[tuple[int, float]]:
        """(class, probability) pairs the label is counted and ranked under."""
        raise NotImplementedError

    @property
    def ranks_top1(self) -> bool:
        """Whether `ranked` is the top-1 alone: then the counts the label stage made while
        labeling are the histograms, and no pass reads the sidecars for them."""
        return False

    def rules(self, hist: Histograms) -> dict[int, ClassRule]:
        raise NotImplementedError

    def select(self, label: PseudoLabel, rules: Rules) -> tuple[list[int], str | None]:
        """The classes the label is kept under, one entry per copy, or the reason it is not
        kept."""
        raise NotImplementedError

    def kept_class(self, label: PseudoLabel, previous: int) -> int:
        """The class of a copy that another filter kept (as `previous`), under new labels."""
        raise NotImplementedError

    def training_label(self, label: PseudoLabel, cls: int) -> PseudoLabel:
        """What a training sample kept under `cls` carries: the soft label."""
        return soft(label)

    def capped(self, hist: Histograms, rules: Rules) -> list[int]:
        """Classes the copy cap kept below --per-class."""
        return []

    def nothing_kept(self, hist: Histograms) -> str:
        """Why the rules keep nothing, in one line the user can act on."""
        return "no pseudo-label has a class to be ranked under: relabel with a larger --topk"


@dataclass(frozen=True, kw_only=True)
class Threshold(Strategy):
    """Noisy Student: a confidence threshold per class, then each class balanced to
    --per-class (cut, or copied up to --max-copies times)."""

    name = "threshold"
    threshold: float
    per_class: int
    max_copies: float
    hard: bool
    balance: str

    def __post_init__(self) -> None:
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {self.balance!r}")

    def ranked(self, label: PseudoLabel) -> list[tuple[int, float]]:
        return [(label.top1, label.confidence)]

    @property
    def ranks_top1(self) -> bool:
        return True

    def rules(self, hist: Histograms) -> dict[int, ClassRule]:
        """t_c is --threshold or a 0.01 step above it, the highest that leaves at least
        --per-class images (with --balance sample, --threshold itself: a class's share is
        drawn from all above it); a class with fewer keeps all above --threshold, each image
        at most --max-copies times."""
        per_class = self.per_class
        start = math.ceil(self.threshold * BINS - 1e-9)
        if start >= BINS:
            return {}
        raised = [b for b in range(0, BINS, BINS // 100) if b > start]
        steps = [start] + (raised if self.balance == "top" else [])
        rules = {}
        for cls, counts in hist.items():
            above = _above(counts)
            if above[start] == 0:
                continue
            enough = [b for b in steps if above[b] >= per_class]
            min_bin = enough[-1] if enough else start
            rate = min(per_class / int(above[min_bin]), self.max_copies)
            rules[cls] = ClassRule(min_bin=min_bin, rate=rate)
        return rules

    def select(self, label: PseudoLabel, rules: Rules) -> tuple[list[int], str | None]:
        rule = rules.get(label.top1)
        if rule is None or not rule.keeps(conf_bin(label.confidence), label.key):
            return [], "below_threshold"
        copies = rule.copies(label.key)
        return ([label.top1] * copies, None) if copies else ([], "balanced_out")

    def kept_class(self, label: PseudoLabel, previous: int) -> int:
        return label.top1

    def training_label(self, label: PseudoLabel, cls: int) -> PseudoLabel:
        return one_hot(label, cls) if self.hard else soft(label)

    def capped(self, hist: Histograms, rules: Rules) -> list[int]:
        per_class = self.per_class
        return [
            cls
            for cls, rule in rules.items()
            if rule.rate < per_class / int(_above(hist[cls])[rule.min_bin])
        ]

    def nothing_kept(self, hist: Histograms) -> str:
        best = {c: bin_floor(max(h.nonzero()[0]) + 1) for c, h in hist.items() if h.any()}
        if not best:
            return "the labels hold no pseudo-label at all: label a corpus that has images"
        shown = ", ".join(f"class {c} {v:.3f}" for c, v in list(best.items())[:10])
        return (
            f"--threshold {self.threshold} keeps no pseudo-label: the highest confidence "
            f"per class is {shown}{' ...' if len(best) > 10 else ''}; lower --threshold"
        )


@dataclass(frozen=True, kw_only=True)
class TopK(Strategy):
    """Yalniz et al.: each image ranked under its --top-p classes, the --per-class most
    confident of each class kept, with one-hot labels."""

    name = "topk"
    per_class: int
    top_p: int

    def ranked(self, label: PseudoLabel) -> list[tuple[int, float]]:
        top_p = self.top_p
        return [
            (int(c), float(p))
            for c, p in zip(label.indices[:top_p], label.probs[:top_p], strict=True)
        ]

    @property
    def ranks_top1(self) -> bool:
        return self.top_p == 1

    def rules(self, hist: Histograms) -> dict[int, ClassRule]:
        """The K most confident per class, ties at the cut broken by the key."""
        per_class = self.per_class
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

    def select(self, label: PseudoLabel, rules: Rules) -> tuple[list[int], str | None]:
        kept: list[int] = []
        for cls, prob in self.ranked(label):
            rule = rules.get(cls)
            if rule is not None and rule.keeps(conf_bin(prob), f"{label.key}/{cls}"):
                kept += [cls] * rule.copies(label.key)
        return (kept, None) if kept else ([], "not_in_top_k")

    def kept_class(self, label: PseudoLabel, previous: int) -> int:
        """The new teacher's top-1: the class ranked under before was the old teacher's."""
        return label.top1

    def training_label(self, label: PseudoLabel, cls: int) -> PseudoLabel:
        return one_hot(label, cls)


STRATEGIES: dict[str, type[Strategy]] = {kind.name: kind for kind in (Threshold, TopK)}


def strategy_of(options: object) -> Strategy:
    """The strategy `options.strategy` names, given the options it reads (an object with
    them as attributes: the filter's arguments)."""
    kind = STRATEGIES[options.strategy]
    return kind(**{f.name: getattr(options, f.name) for f in fields(kind)})

"""What `pipeline stats` shows of pseudo-labels, kept additive: a worker summarises its shard
into its report, the launcher adds the reports up, and stats reads the sum in seconds
instead of reading 130,000 shards again."""

from __future__ import annotations

from collections import Counter

from rs_pseudolabel.pipeline.confidence import COARSE_BINS, coarse_bin

ENTROPY_STEP = 0.1


def entropy_bin(entropy: float) -> int:
    return max(int(entropy / ENTROPY_STEP), 0)


class LabelSummary:
    """Top-1 classes, confidence and entropy histograms of a set of pseudo-labels."""

    def __init__(self) -> None:
        self.top1: Counter = Counter()
        self.confidence = [0] * COARSE_BINS
        self.entropy: Counter = Counter()

    def add(self, top1: int, confidence: float, entropy: float) -> None:
        self.top1[top1] += 1
        self.confidence[coarse_bin(confidence)] += 1
        self.entropy[entropy_bin(entropy)] += 1

    def to_json(self) -> dict:
        """JSON keys are strings; `reports.add_into` sums these across shards."""
        return {
            "top1": {str(k): v for k, v in self.top1.items()},
            "confidence": list(self.confidence),
            "entropy": {str(k): v for k, v in self.entropy.items()},
        }

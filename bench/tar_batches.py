"""The JPEGs of a folder's shards in batches, read with tarfile alone: the input side of the
plain loops the label benchmarks compare against (label_plain.py, label_plain_timm.py),
imported by them as a sibling so that their start-up stays the standard library's."""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Iterator


def jpeg_batches(folder: str, batch_size: int) -> Iterator[list[bytes]]:
    for path in sorted(glob.glob(f"{folder}/*.tar")):
        with tarfile.open(path) as tar:
            images = [
                tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")
            ]
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]

"""Shared fixtures: real shards written through the project's own commands."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.digits import write_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded corpus, written once per test session."""
    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out), labeled=200, seed=0)
    return out


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    """A real encoded image with some structure, in any Pillow mode."""
    rng = np.random.default_rng(sum(map(ord, mode)) + size[0])
    if mode in ("I;16", "I"):
        arr = rng.integers(0, 65535, size[::-1], dtype=np.uint16)
        img = Image.fromarray(arr if mode == "I;16" else arr.astype(np.int32))
    else:
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        img = img.convert(mode) if mode != "RGB" else img
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()

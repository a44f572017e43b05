"""Hostile images become reasons, never exceptions; odd modes become RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from rs_pseudolabel.data.decode import decode_image
from tests.conftest import image_bytes


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("CMYK", "JPEG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("I;16", "PNG"),
        ("I", "TIFF"),
        ("1", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "JPEG"),
    ],
)
def test_every_mode_decodes_to_rgb(mode: str, fmt: str):
    img, reason = decode_image(image_bytes(mode, fmt=fmt))
    assert reason is None
    assert img.mode == "RGB" and img.size == (40, 30)


def test_sixteen_bit_keeps_its_contrast():
    arr = np.zeros((4, 8), np.uint16)
    arr[:, 4:] = 60000
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img, _ = decode_image(buf.getvalue())
    px = np.asarray(img)
    assert px[0, 0, 0] == 0 and px[0, 7, 0] > 200


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    img, _ = decode_image(buf.getvalue())
    assert np.asarray(img).min() == 255


def test_tiny_image_decodes():
    img, reason = decode_image(image_bytes("RGB", size=(1, 1)))
    assert reason is None and img.size == (1, 1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (b"hello, I am a text file\n" * 10, "undecodable_image"),
        (image_bytes("RGB", size=(200, 200), fmt="JPEG")[:5000], "truncated_image"),
        (image_bytes("RGB", size=(200, 200), fmt="PNG")[:-300], "truncated_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "undecodable_image"),
    ],
)
def test_bad_bytes_give_a_reason(data: bytes, reason: str):
    assert decode_image(data) == (None, reason)


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1_000_000
    assert decode_image(buf.getvalue()) == (None, "image_too_large")
    assert decode_image(image_bytes(size=(100, 100)), max_pixels=5_000) == (None, "image_too_large")

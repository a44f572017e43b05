"""Image decoding that never crashes a stage: a bad image becomes a reason, not a traceback."""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
DECODERS = ("auto", "cpu", "device", "gpu")  # `pipeline label --decode`; gpu: device's old name
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


def find_image(sample: dict) -> tuple[str, bytes] | None:
    """The first image member of a sample, by the extension order above."""
    for ext in IMAGE_EXTS:
        value = sample.get(ext)
        if value is not None:
            return ext, value
    return None


def no_image_detail(sample: dict) -> str:
    """Why a sample has no image member, where its member names tell: `photo.v2.001.png` is
    read as key `photo` with a member `v2.001.png` (WebDataset ends a key at its first dot),
    which is an image under a name no reader looks for."""
    cut = next(
        (
            name
            for name in sample
            if not name.startswith("__") and "." in name
            and name.rsplit(".", 1)[1].lower() in IMAGE_EXTS
        ),
        None,
    )  # fmt: skip
    if cut is None:
        return ""
    return (
        f"member {cut!r} is an image whose file name had a dot after {sample['__key__']!r}: "
        "WebDataset ends a key at its first dot; `pipeline data ingest` writes such files "
        "under keys without dots"
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Bring any mode Pillow decodes (CMYK, L, LA, P, RGBA, 16-bit, float) to 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("LA", "RGBA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(
    data: bytes, max_pixels: int = MAX_PIXELS
) -> tuple[Image.Image | None, str | None]:
    """Decode image bytes to RGB, or return (None, reason) for anything that cannot be used.

    The size is checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing.
    """
    if not data:
        return None, "empty_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return None, "image_too_large"
            if width < 1 or height < 1:
                return None, "empty_image"
            img.load()
            return _to_rgb(img), None
    except Image.DecompressionBombError:
        return None, "image_too_large"
    except UnidentifiedImageError:
        return None, "undecodable_image"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return None, "truncated_image" if "truncated" in str(exc) else "undecodable_image"


RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class EvalCrop:
    """A teacher's eval preprocessing before normalisation: shorter side resized to `resize`,
    center crop `crop` x `crop`. Pixel for pixel what torchvision's v2 `resize` (antialiased)
    and `center_crop` do to a PIL image, in Pillow and numpy alone, so that decode processes
    start without importing torch."""

    resize: int
    crop: int
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != (width, height):
            img = img.resize(size, RESAMPLING[self.interpolation])
        left = int(round((size[0] - self.crop) / 2.0))
        top = int(round((size[1] - self.crop) / 2.0))
        return img.crop((left, top, left + self.crop, top + self.crop))

    def pixels(self, data: bytes) -> tuple[np.ndarray | None, str | None]:
        """Image bytes -> (crop x crop x 3 uint8 array, None), or (None, drop reason)."""
        img, reason = decode_image(data)
        if img is None:
            return None, reason
        return np.asarray(self(img)), None


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int  # 1 gray, 3 YCbCr, 4 CMYK or YCCK
    progressive: bool


_SOF_BASELINE, _SOF_EXTENDED, _SOF_PROGRESSIVE = 0xC0, 0xC1, 0xC2
JPEG_START = b"\xff\xd8"  # start-of-image: the first bytes of every JPEG


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of a Huffman-coded JPEG, read from its markers without decoding;
    None for anything else (another format, arithmetic or lossless coding, no frame header).
    A few bytes are touched per marker segment, so it costs microseconds per image."""
    if data[:2] != JPEG_START:
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (_SOF_BASELINE, _SOF_EXTENDED, _SOF_PROGRESSIVE):
            if pos + 10 > end:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return JpegHeader(width, height, data[pos + 9], marker == _SOF_PROGRESSIVE)
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # another coding, or scan data before any frame header
        pos += 2 + length
    return None


def eval_stack(crop: EvalCrop, images: list[bytes]) -> tuple[np.ndarray, list[str | None], float]:
    """`crop.pixels` of each image as one (decoded, crop, crop, 3) uint8 array, each image's
    drop reason (None where decoded) and the seconds it took: the unit of work a decode
    process is handed, one array to send back instead of one per image."""
    started = time.perf_counter()
    decoded, reasons = [], []
    for data in images:
        pixels, reason = crop.pixels(data)
        reasons.append(reason)
        if pixels is not None:
            decoded.append(pixels)
    stack = np.stack(decoded) if decoded else np.zeros((0, crop.crop, crop.crop, 3), np.uint8)
    return stack, reasons, time.perf_counter() - started

"""Image decoding that never crashes a stage: a bad image becomes a reason, not a traceback."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


def find_image(sample: dict) -> tuple[str, bytes] | None:
    """The first image member of a sample, by the extension order above."""
    for ext in IMAGE_EXTS:
        value = sample.get(ext)
        if value is not None:
            return ext, value
    return None


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


def eval_chunk(crop: EvalCrop, images: list[bytes]) -> list[tuple[np.ndarray | None, str | None]]:
    """`crop.pixels` of each image: the unit of work a decode process is handed."""
    return [crop.pixels(data) for data in images]

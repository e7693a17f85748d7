"""Image files: probe their size from the header, read them as uint8 RGB, write them atomically.

A missing or unreadable file raises ImageError, a UserError whose `kind` is the ProblemReport kind
("missing-image" / "corrupt-image"), so readers can count it and CLIs can print it as one line.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.atomic import write_bytes_atomic  # noqa: F401  (re-exported: the data layer's writer)
from runtime.data.problems import CORRUPT_IMAGE, MISSING_IMAGE
from runtime.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


class ImageError(UserError):
    """An image that is missing or cannot be decoded; `kind` names the problem."""

    def __init__(self, kind: str, path: Path, what: str):
        self.kind = kind
        super().__init__(what, where=str(path), fix="replace the file or remove the image from the split")


def probe_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(MISSING_IMAGE, path, "image file not found")
    # DOTA images reach 20000 x 20000 px, beyond PIL's decompression-bomb guard; only the header is read here.
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(CORRUPT_IMAGE, path, f"not a readable image ({type(exc).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if width <= 0 or height <= 0:
        raise ImageError(CORRUPT_IMAGE, path, f"image header gives size {width}x{height}")
    return int(width), int(height)


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(MISSING_IMAGE, path, "image not found")
    data = np.fromfile(path, dtype=np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    # Annotations are in stored-pixel coordinates, so EXIF orientation must not rotate the image.
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if bgr is None:
        raise ImageError(CORRUPT_IMAGE, path, "cannot decode image (corrupt or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_image_raw(path: Path) -> np.ndarray:
    """Decode an image keeping its channels and bit depth (for cropping patches without changing pixels)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(MISSING_IMAGE, path, "image file not found")
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ImageError(CORRUPT_IMAGE, path, "image could not be decoded")
    return img


def encode_image(image: np.ndarray, suffix: str, jpeg_quality: int = 95) -> bytes:
    """Encode an image array (cv2 channel order) to the bytes of a .jpg / .png / ... file."""
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(suffix, image, params)
    if not ok:
        raise UserError(f"cannot encode an image as {suffix}", fix="use .jpg or .png")
    return buf.tobytes()

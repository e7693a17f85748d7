"""Image pre-processing shared by training (distill), INT8 calibration (deploy) and inference (runtime).

Both sides call these functions, so the network sees identical tensors by construction: uint8 RGB is resized with
OpenCV INTER_LINEAR (stretched to the input size, or letterboxed), then scaled to float32 [0, 1] CHW
(:func:`to_training_array`; torchvision's model transform normalises it during training) or normalised here
((x / 255 - mean) / std, :func:`normalize`) for the exported network, which starts at the backbone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.boxes import clip_boxes
from runtime.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessSpec(BaseModel):
    """How an image becomes the network input; stored in the deploy bundle's manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: tuple[int, int] = Field(description="network input (height, width) in pixels")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: Literal["stretch", "letterbox"] = "stretch"
    pad_value: int = Field(0, ge=0, le=255, description="uint8 fill of the letterbox border")
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32", "float16"] = "float32"

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) <= 0:
            raise ValueError(f"input_size must be positive (height, width), got {v}")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"std must be positive, got {v}")
        return v


@dataclass(frozen=True)
class Transform:
    """Geometry of one resize: input = original * scale + pad (per axis), plus both image sizes for clipping."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    orig_size: tuple[int, int]  # (height, width) of the original image
    input_size: tuple[int, int]  # (height, width) of the network input

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes (N, 4) from network-input pixels to original-image pixels, clipped to the image."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        pad = np.array([self.pad_x, self.pad_y] * 2, np.float32)
        scale = np.array([self.scale_x, self.scale_y] * 2, np.float32)
        out = (boxes - pad) / scale
        height, width = self.orig_size
        return clip_boxes(out, width, height)

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes (N, 4) from original-image pixels to network-input pixels (e.g. training targets)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scale = np.array([self.scale_x, self.scale_y] * 2, np.float32)
        return boxes * scale + np.array([self.pad_x, self.pad_y] * 2, np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3); UserError when it is missing or cannot be decoded."""
    from runtime.data.images import read_image as decode  # the data layer's reader: one decoder for every path

    return decode(Path(path))


def _check_image(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {got}")


def resize_image(img: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Transform]:
    """Resize uint8 RGB to ``spec.input_size`` (stretch or letterbox, INTER_LINEAR); return it and its Transform."""
    _check_image(img)
    height, width = img.shape[:2]
    out_h, out_w = spec.input_size
    if spec.resize == "stretch":
        resized = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        return resized, Transform(out_w / width, out_h / height, 0.0, 0.0, (height, width), (out_h, out_w))
    scale = min(out_h / height, out_w / width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    pad_x, pad_y = (out_w - new_w) // 2, (out_h - new_h) // 2
    canvas = np.full((out_h, out_w, 3), spec.pad_value, np.uint8)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    # Rounding to whole pixels makes the effective scale differ slightly per axis; record the exact one.
    return canvas, Transform(new_w / width, new_h / height, float(pad_x), float(pad_y), (height, width), (out_h, out_w))


def to_training_array(resized: np.ndarray) -> np.ndarray:
    """uint8 HWC (or NHWC) RGB -> float32 CHW (or NCHW) in [0, 1], the tensor torchvision detection models take."""
    axes = (2, 0, 1) if resized.ndim == 3 else (0, 3, 1, 2)
    x = np.ascontiguousarray(resized.transpose(axes)).astype(np.float32)
    x /= np.float32(255)  # in place: same float32 division, one allocation less
    return x


@lru_cache(maxsize=8)
def _normalization_table(mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    """(3, 1, 256) float32: (v / 255 - mean[c]) / std[c] for every uint8 value v, in :func:`normalize`'s order."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    table = (values[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    return np.ascontiguousarray(table.reshape(3, 1, 256))


def normalize(resized: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC (or NHWC) RGB -> normalised (x / 255 - mean) / std CHW (NCHW), the exported network's input.

    Computed in float32 in the same order as torchvision's GeneralizedRCNNTransform.normalize, so it is bit-identical:
    a uint8 pixel has 256 values, so each channel plane goes through a 256-entry table of exactly those results
    (OpenCV's ``cv2.LUT``, written straight into the CHW output: one pass instead of numpy's five).
    """
    out = _normalized(resized if resized.ndim == 4 else [resized], spec)
    return out if resized.ndim == 4 else out[0]


def _normalized(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Same-size uint8 HWC images -> the (N, 3, H, W) input of :func:`normalize`, without stacking them first."""
    table = _normalization_table(spec.mean, spec.std)
    out = np.empty((len(images), 3, *images[0].shape[:2]), np.float32)
    for image, planes in zip(images, out):
        for channel, plane in enumerate(cv2.split(np.ascontiguousarray(image))):
            cv2.LUT(plane, table[channel], dst=planes[channel])
    return out.astype(spec.dtype, copy=False)


def preprocess_batch(images: Sequence[np.ndarray], spec: PreprocessSpec) -> tuple[np.ndarray, list[Transform]]:
    """Resize and normalise uint8 RGB images into one (N, 3, H, W) array, with each image's Transform."""
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image")
    resized, transforms = zip(*(resize_image(img, spec) for img in images))
    return _normalized(resized, spec), list(transforms)

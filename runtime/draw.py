"""Pictures of detections: labelled boxes drawn with OpenCV, written as PNG atomically."""
from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from runtime.data.images import encode_image, write_bytes_atomic
from runtime.postprocess import Detections


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour per class (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, dets: Detections, classes: Sequence[str],
                    score_thresh: float = 0.0) -> np.ndarray:
    """A copy of the uint8 RGB image with each detection above ``score_thresh`` boxed and labelled 'class 0.87'."""
    canvas = np.ascontiguousarray(image.copy())
    # Line width and font grow with the image so labels stay readable on 4000 px scenes and 256 px patches alike.
    thickness = max(1, round(max(image.shape[:2]) / 600))
    font_scale = 0.35 * thickness
    order = np.argsort(dets.scores, kind="stable")  # best drawn last, on top
    for i in order:
        if dets.scores[i] < score_thresh:
            continue
        label = int(dets.labels[i])
        x1, y1, x2, y2 = (int(round(v)) for v in dets.boxes[i])
        color = class_color(label)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        name = classes[label] if 0 <= label < len(classes) else str(label)
        text = f"{name} {dets.scores[i]:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        ty = y1 - th - base if y1 - th - base >= 0 else y1  # label above the box, inside it at the top edge
        cv2.rectangle(canvas, (x1, ty), (x1 + tw, ty + th + base), color, cv2.FILLED)
        cv2.putText(canvas, text, (x1, ty + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness,
                    cv2.LINE_AA)
    return canvas


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a uint8 RGB image as PNG (temporary name, then rename)."""
    path = Path(path)
    write_bytes_atomic(path, encode_image(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), ".png"))
    return path

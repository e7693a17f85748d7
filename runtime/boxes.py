"""Box and polygon geometry in numpy (torch-free): conversions, clipping, validity, area inside an image.

Conventions: boxes are (N, 4) in pixels, xyxy = (x1, y1, x2, y2) with x2 >= x1 for a valid box; the image
covers the continuous range [0, width] x [0, height] (torchvision's clip_boxes_to_image uses the same range).
Polygons are (K, 2) vertex arrays; DOTA quadrilaterals are (N, 8) rows x1 y1 ... x4 y4.
"""
from __future__ import annotations

import numpy as np


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(x1, y1, x2, y2) -> (x, y, w, h), the COCO bbox form."""
    b = _as_boxes(boxes)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(x, y, w, h) -> (x1, y1, x2, y2)."""
    b = _as_boxes(boxes)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Area of each xyxy box; 0 for boxes with non-positive width or height."""
    b = _as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip xyxy boxes (N, 4) to the image [0, width] x [0, height] (a new array); float32 boxes stay float32 (the
    runtime's detections), anything else becomes float64. The one box clipping of runtime/."""
    b = np.asarray(boxes)
    b = b.reshape(-1, 4).astype(np.float32 if b.dtype == np.float32 else np.float64)  # a copy: clipped in place
    np.maximum(b, 0, out=b)  # np.clip's two ufuncs, without its wrapper's overhead (a hot path of post-processing)
    return np.minimum(b, np.array([width, height, width, height], b.dtype), out=b)


def valid_boxes(boxes: np.ndarray, min_size: float = 0.0) -> np.ndarray:
    """True where a box is finite and wider and taller than `min_size` (strictly positive size by default)."""
    b = _as_boxes(boxes)
    finite = np.isfinite(b).all(axis=1)
    with np.errstate(invalid="ignore"):
        return finite & (b[:, 2] - b[:, 0] > min_size) & (b[:, 3] - b[:, 1] > min_size)


def inside_fraction(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Fraction of each box's area inside the image (0 for degenerate boxes)."""
    b = _as_boxes(boxes)
    area = box_area(b)
    inside = box_area(clip_boxes(b, width, height))
    return np.divide(inside, area, out=np.zeros_like(area), where=area > 0)


def poly_to_hbb(polys: np.ndarray) -> np.ndarray:
    """Horizontal bounding boxes (N, 4) xyxy of polygons given as (N, 2K) or (N, K, 2) coordinates."""
    p = np.asarray(polys, dtype=np.float64)
    p = p.reshape(p.shape[0], -1, 2) if p.ndim != 3 else p
    if p.shape[0] == 0:
        return np.zeros((0, 4), np.float64)
    return np.concatenate([p.min(axis=1), p.max(axis=1)], axis=1)


def polygon_area(poly: np.ndarray) -> float:
    """Unsigned area of a simple polygon (K, 2) by the shoelace formula; 0 for fewer than 3 vertices."""
    p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def clip_polygon(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Clip a polygon (K, 2) to the rectangle [x0, x1] x [y0, y1] (Sutherland-Hodgman); (M, 2), M may be 0.

    Exact for any simple polygon (convex or not) because the clip window is convex; cv2.intersectConvexConvex
    would need a convex subject, and hand-drawn DOTA quadrilaterals are not always convex.
    """
    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    # Each edge of the window as (axis, bound, keep side): keep v[axis] >= bound (sign +1) or <= bound (-1).
    for axis, bound, sign in ((0, x0, 1.0), (0, x1, -1.0), (1, y0, 1.0), (1, y1, -1.0)):
        if len(pts) == 0:
            break
        nxt = np.roll(pts, -1, axis=0)
        d_cur = sign * (pts[:, axis] - bound)
        d_nxt = sign * (nxt[:, axis] - bound)
        out: list[np.ndarray] = []
        for p, q, dp, dq in zip(pts, nxt, d_cur, d_nxt):
            if dp >= 0:
                out.append(p)
            if (dp >= 0) != (dq >= 0):
                t = dp / (dp - dq)
                cut = p + t * (q - p)
                cut[axis] = bound  # exact on the edge, no rounding drift
                out.append(cut)
        pts = np.array(out, dtype=np.float64).reshape(-1, 2)
    return pts


def polygon_inside_fraction(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    """Fraction of a polygon's area inside the rectangle [x0, x1] x [y0, y1] (0 for a zero-area polygon)."""
    area = polygon_area(poly)
    if area <= 0:
        return 0.0
    return min(1.0, polygon_area(clip_polygon(poly, x0, y0, x1, y1)) / area)

"""Tiled inference for scenes larger than the network input (DOTA images reach ~4000 px and beyond).

The scene is cut into tiles (default: the network input size, overlapping by a quarter of a tile), the tiles run
through the detector in batches at scale 1 (a tile smaller than the tile size, at an image smaller than a tile, is
padded rather than stretched so every tile sees the same scale), each tile's boxes are shifted back by its offset,
and class-wise NMS across all tiles merges the objects found twice in overlaps.

Why the overlap matters: consecutive tiles share at least ``overlap`` pixels, so any object no larger than the
overlap lies whole inside some tile. A tile that cuts such an object at a seam sees only a piece of it, and the
piece's box overlaps the whole box too little for NMS to remove it; so a box that touches a tile's inner edge and
lies wholly inside the neighbouring tile (which therefore sees at least as much of the object) is dropped first.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from runtime.boxes import clip_boxes
from runtime.nms import batched_nms
from runtime.postprocess import Detections

Box = tuple[int, int, int, int]
# Tiles per detector call. TensorRT engines with a dynamic batch axis are tuned for it (their profile's opt batch).
TILE_BATCH = 4


class TileDetector(Protocol):
    """What tiling needs from a detector: its input size and detection in each image's own pixels."""

    input_size: tuple[int, int]  # (height, width)
    nms_iou: float

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of each uint8 RGB image, in that image's pixels."""
        ...


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    # Regular steps, then one last tile flush with the far edge (it may overlap its neighbour by more).
    return list(range(0, length - tile, step)) + [length - tile]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))


def tile_grid(width: int, height: int, tile: int | Sequence[int], overlap: int) -> list[Box]:
    """Tiles (x0, y0, x1, y1) covering a width x height image, row-major; ``tile`` is a size or (width, height).

    Neighbours overlap by at least ``overlap`` px, the last tile of a row / column is flush with the image edge, and
    an image smaller than a tile gets a single tile clipped to the image.
    """
    tile_w, tile_h = _pair(tile)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    if tile_w <= 0 or tile_h <= 0:
        raise ValueError(f"tile size must be positive, got {tile_w} x {tile_h}")
    if not 0 <= overlap < min(tile_w, tile_h):
        raise ValueError(f"overlap must be in [0, tile size), got {overlap} for tile {tile_w} x {tile_h}")
    return [(x0, y0, min(x0 + tile_w, width), min(y0 + tile_h, height))
            for y0 in _starts(height, tile_h, overlap) for x0 in _starts(width, tile_w, overlap)]


def crop_tile(image: np.ndarray, box: Box, tile: int | Sequence[int], pad_value: int = 0) -> np.ndarray:
    """The image region ``box``, padded bottom / right to the full tile size (so no tile is stretched)."""
    tile_w, tile_h = _pair(tile)
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1]
    if crop.shape[:2] == (tile_h, tile_w):
        return np.ascontiguousarray(crop)
    canvas = np.full((tile_h, tile_w, image.shape[2]), pad_value, image.dtype)
    canvas[: y1 - y0, : x1 - x0] = crop
    return canvas


def to_image_coordinates(dets: Detections, box: Box) -> Detections:
    """Shift one tile's detections by the tile offset, clipped to the tile's real (unpadded) extent."""
    x0, y0, x1, y1 = box
    boxes = clip_boxes(np.asarray(dets.boxes, np.float32), x1 - x0, y1 - y0) + np.array([x0, y0, x0, y0], np.float32)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # boxes wholly in the padding vanish
    return Detections(boxes[keep].astype(np.float32), dets.scores[keep], dets.labels[keep])


def detect_tiles(detector: TileDetector, image: np.ndarray, grid: Sequence[Box], tile: int | Sequence[int],
                 batch_size: int = TILE_BATCH) -> list[Detections]:
    """Each tile's detections in image coordinates (before merging), tiles run in batches of ``batch_size``."""
    out: list[Detections] = []
    for start in range(0, len(grid), max(1, batch_size)):
        boxes = grid[start:start + batch_size]
        crops = [crop_tile(image, box, tile) for box in boxes]
        out.extend(to_image_coordinates(d, box) for d, box in zip(detector.detect(crops), boxes))
    return out


def _neighbours(starts: list[int], ends: list[int]) -> dict[int, tuple[int | None, int | None]]:
    """Per tile start along one axis: (end of the previous tile, start of the next tile), None at the image edge."""
    return {s: (ends[i - 1] if i > 0 else None, starts[i + 1] if i + 1 < len(starts) else None)
            for i, s in enumerate(starts)}


def drop_seam_pieces(parts: Sequence[Detections], grid: Sequence[Box], margin: float = 2.0) -> list[Detections]:
    """Remove boxes cut by a tile's inner edge (within ``margin`` px) that the neighbouring tile holds whole.

    ``parts`` are per-tile detections in image coordinates, in ``grid`` order.
    """
    xs = sorted({(b[0], b[2]) for b in grid})
    ys = sorted({(b[1], b[3]) for b in grid})
    x_nb = _neighbours([a for a, _ in xs], [b for _, b in xs])
    y_nb = _neighbours([a for a, _ in ys], [b for _, b in ys])
    out = []
    for dets, (x0, y0, x1, y1) in zip(parts, grid):
        b = dets.boxes
        cut = np.zeros(len(b), bool)
        for lo, hi, (prev_end, next_start), axis in ((x0, x1, x_nb[x0], 0), (y0, y1, y_nb[y0], 1)):
            first, last = b[:, axis], b[:, axis + 2]
            if prev_end is not None:  # the previous tile spans [.., prev_end]
                cut |= (first <= lo + margin) & (last <= prev_end)
            if next_start is not None:  # the next tile spans [next_start, ..]
                cut |= (last >= hi - margin) & (first >= next_start)
        out.append(Detections(b[~cut], dets.scores[~cut], dets.labels[~cut]))
    return out


def merge_detections(parts: Sequence[Detections], nms_iou: float, max_detections: int | None = None) -> Detections:
    """Concatenate detections and keep one per object with class-wise NMS, best first (at most ``max_detections``)."""
    if not parts:
        return Detections()
    boxes = np.concatenate([p.boxes for p in parts]).astype(np.float32)
    scores = np.concatenate([p.scores for p in parts]).astype(np.float32)
    labels = np.concatenate([p.labels for p in parts]).astype(np.int64)
    keep = batched_nms(boxes, scores, labels, nms_iou)
    if max_detections is not None:
        keep = keep[:max_detections]
    return Detections(boxes[keep], scores[keep], labels[keep])


def default_tile(detector: TileDetector) -> tuple[int, int]:
    """The network input (width, height): tiles then run at scale 1."""
    height, width = detector.input_size
    return width, height


def tiled_detect(detector: TileDetector, image: np.ndarray, tile: int | Sequence[int] | None = None,
                 overlap: int | None = None, batch_size: int = TILE_BATCH, max_detections: int | None = None,
                 seam_margin: float | None = 2.0) -> Detections:
    """Detect on a large uint8 RGB image tile by tile; boxes in image pixels, merged across tiles.

    ``tile`` defaults to the network input, ``overlap`` to a quarter of the smaller tile side; ``max_detections``
    caps the merged result (default: no cap, a scene holds more objects than one tile's limit); ``seam_margin``
    None keeps the pieces of objects cut at tile seams (see :func:`drop_seam_pieces`).
    """
    tile_w, tile_h = _pair(tile) if tile is not None else default_tile(detector)
    overlap = min(tile_w, tile_h) // 4 if overlap is None else int(overlap)
    height, width = image.shape[:2]
    grid = tile_grid(width, height, (tile_w, tile_h), overlap)
    parts = detect_tiles(detector, image, grid, (tile_w, tile_h), batch_size)
    if seam_margin is not None:
        parts = drop_seam_pieces(parts, grid, seam_margin)
    return merge_detections(parts, detector.nms_iou, max_detections)

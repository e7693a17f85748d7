"""Tiled inference: the grid covers the scene, tile offsets are restored, overlaps are merged once."""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_detector_equivalence import DOTA, make_tiny_bundle

from runtime.detector import Detector
from runtime.nms import box_iou
from runtime.postprocess import Detections
from runtime.preprocess import read_image
from runtime.tiling import crop_tile, detect_tiles, tile_grid, tiled_detect


@st.composite
def grids(draw):
    tile = draw(st.integers(8, 600))
    overlap = draw(st.integers(0, tile // 2))
    return draw(st.integers(1, 3000)), draw(st.integers(1, 3000)), tile, overlap


@settings(max_examples=300, deadline=None)
@given(grids())
def test_grid_covers_the_image_with_the_overlap(args):
    width, height, tile, overlap = args
    grid = tile_grid(width, height, tile, overlap)
    for axis, length in ((0, width), (1, height)):
        spans = sorted({(b[axis], b[axis + 2]) for b in grid})
        assert spans[0][0] == 0 and spans[-1][1] == length  # first at the origin, last flush with the edge
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert b0 <= a1 - overlap  # neighbours share at least `overlap` px, so no gap either
        assert all(hi - lo == min(tile, length) for lo, hi in spans)
    assert len(grid) == len({b[0] for b in grid}) * len({b[1] for b in grid})


@settings(max_examples=300, deadline=None)
@given(grids(), st.data())
def test_object_smaller_than_the_overlap_is_whole_in_some_tile(args, data):
    width, height, tile, overlap = args
    ow = data.draw(st.integers(1, max(1, min(overlap, width))))
    oh = data.draw(st.integers(1, max(1, min(overlap, height))))
    x = data.draw(st.integers(0, width - ow))
    y = data.draw(st.integers(0, height - oh))
    assert any(x0 <= x and y0 <= y and x + ow <= x1 and y + oh <= y1
               for x0, y0, x1, y1 in tile_grid(width, height, tile, overlap))


def test_bad_grid_arguments_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(100, 100, 64, 64)
    with pytest.raises(ValueError, match="tile size"):
        tile_grid(100, 100, 0, 0)


class MarkerDetector:
    """Finds pure-red squares exactly (connected components): a detector whose right answer is known."""

    def __init__(self, tile: int):
        self.input_size = (tile, tile)
        self.nms_iou = 0.5

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        out = []
        for img in images:
            mask = ((img[..., 0] == 255) & (img[..., 1] == 0)).astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:]], np.float32).reshape(-1, 4)
            out.append(Detections(boxes, np.full(n - 1, 0.9, np.float32), np.zeros(n - 1, np.int64)))
        return out


def test_markers_are_found_once_at_their_place_in_a_large_scene():
    """Squares smaller than the overlap, many straddling tile seams, come back exactly once each."""
    rng = np.random.default_rng(0)
    width, height, tile, overlap = 1111, 1182, 256, 64
    scene = rng.integers(0, 200, (height, width, 3), dtype=np.uint8)
    truth = []
    for gy in range(30, height - 60, 73):
        for gx in range(20, width - 60, 67):
            w, h = (int(v) for v in rng.integers(6, overlap, 2))
            x, y = gx + int(rng.integers(0, 10)), gy + int(rng.integers(0, 10))
            w, h = min(w, 60), min(h, 60)
            scene[y:y + h, x:x + w] = (255, 0, 0)
            truth.append((x, y, x + w, y + h))
    truth = np.array(truth, np.float32)
    found = tiled_detect(MarkerDetector(tile), scene, overlap=overlap)
    assert len(found) == len(truth)
    order = np.lexsort((found.boxes[:, 0], found.boxes[:, 1]))
    np.testing.assert_array_equal(found.boxes[order], truth[np.lexsort((truth[:, 0], truth[:, 1]))])
    # Without dropping the pieces cut at seams, the same scene gives duplicates: the rule above is doing the work.
    assert len(tiled_detect(MarkerDetector(tile), scene, overlap=overlap, seam_margin=None)) > len(truth)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling_bundle")
    make_tiny_bundle(root, size=128, dynamic_batch=True, score_thresh=0.5)
    with Detector(root, backend="ort-cpu", threads=1, batch_size=8) as det:
        yield det


@pytest.fixture(scope="module")
def p0706():
    image = read_image(DOTA / "P0706.png")
    assert image.shape == (1182, 1111, 3)
    return image


def test_tiles_of_p0706_map_back_to_their_place(detector, p0706):
    """Each tile's detections are the detector's on that crop, shifted by the tile's offset."""
    grid = tile_grid(1111, 1182, 128, 32)
    assert len(grid) == 12 * 12  # 11 regular steps of 96 px and one tile flush with the edge, per axis
    picked = [grid[0], grid[17], grid[-1]]  # the origin, an inner tile, the flush corner
    parts = detect_tiles(detector, p0706, picked, 128)
    for box, part in zip(picked, parts):
        direct = detector.detect([p0706[box[1]:box[3], box[0]:box[2]]])[0]
        real = (direct.boxes[:, 2] > direct.boxes[:, 0]) & (direct.boxes[:, 3] > direct.boxes[:, 1])
        assert real.sum() > 0 and len(part) == real.sum()  # tiling drops only zero-area boxes
        np.testing.assert_allclose(part.boxes - np.array(box[:2] * 2, np.float32), direct.boxes[real], atol=1e-3)
        np.testing.assert_allclose(part.scores, direct.scores[real], atol=1e-6)


def test_scene_of_one_tile_equals_direct_inference(detector, p0706):
    crop = np.ascontiguousarray(p0706[300:428, 500:628])
    tiled = tiled_detect(detector, crop, max_detections=detector.max_detections)
    direct = detector.detect([crop])[0]
    real = (direct.boxes[:, 2] > direct.boxes[:, 0]) & (direct.boxes[:, 3] > direct.boxes[:, 1])
    assert len(tiled) > 0
    np.testing.assert_allclose(tiled.boxes, direct.boxes[real], atol=1e-4)
    np.testing.assert_array_equal(tiled.labels, direct.labels[real])


def test_tiled_p0706_is_merged_and_inside_the_scene(detector, p0706):
    merged = tiled_detect(detector, p0706, overlap=32)
    assert len(merged) > 100  # a 1111 x 1182 scene seen through 144 tiles, not one tile's 100
    assert (merged.boxes >= 0).all() and (merged.boxes[:, [0, 2]] <= 1111).all() \
        and (merged.boxes[:, [1, 3]] <= 1182).all()
    assert (np.diff(merged.scores) <= 0).all()
    for label in np.unique(merged.labels):  # class-wise NMS across tiles: no two same-class boxes overlap much
        boxes = merged.boxes[merged.labels == label]
        iou = box_iou(boxes, boxes)
        np.fill_diagonal(iou, 0)
        assert iou.max() <= detector.nms_iou + 1e-6


def test_small_image_is_padded_not_stretched():
    image = np.full((50, 70, 3), 7, np.uint8)
    tile = crop_tile(image, (0, 0, 70, 50), 128)
    assert tile.shape == (128, 128, 3)
    assert (tile[:50, :70] == 7).all() and (tile[50:] == 0).all() and (tile[:, 70:] == 0).all()

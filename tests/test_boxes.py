"""Property tests for the numpy box / polygon geometry in runtime.boxes."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

# No per-example deadline: the CI machine is shared, and these are correctness (not speed) properties.
relaxed = settings(deadline=None)

from runtime.boxes import (
    box_area,
    clip_boxes,
    clip_polygon,
    inside_fraction,
    poly_to_hbb,
    polygon_area,
    polygon_inside_fraction,
    valid_boxes,
    xywh_to_xyxy,
    xyxy_to_xywh,
)

coord = st.floats(-500, 1500, allow_nan=False, allow_infinity=False)
# Sizes are pixels: exactly 0 (degenerate) or at least 1e-6 px; hypothesis otherwise draws sizes like 1e-190 whose
# area underflows to 0 in float64, which no image box has.
size = st.just(0.0) | st.floats(1e-6, 800, allow_nan=False, allow_infinity=False)
image_side = st.integers(1, 1200)


@st.composite
def boxes_xyxy(draw, n_max: int = 8) -> np.ndarray:
    n = draw(st.integers(0, n_max))
    rows = [(x, y, x + w, y + h) for x, y, w, h in (draw(st.tuples(coord, coord, size, size)) for _ in range(n))]
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


@relaxed
@given(boxes_xyxy())
def test_xywh_round_trip(boxes):
    back = xywh_to_xyxy(xyxy_to_xywh(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-9)
    assert (xyxy_to_xywh(boxes)[:, 2:] >= 0).all()


@relaxed
@given(boxes_xyxy(), image_side, image_side)
def test_clip_keeps_boxes_inside_and_is_idempotent(boxes, w, h):
    clipped = clip_boxes(boxes, w, h)
    assert (clipped[:, 0::2] >= 0).all() and (clipped[:, 0::2] <= w).all()
    assert (clipped[:, 1::2] >= 0).all() and (clipped[:, 1::2] <= h).all()
    np.testing.assert_array_equal(clip_boxes(clipped, w, h), clipped)
    assert (box_area(clipped) <= box_area(boxes) + 1e-6).all()


@relaxed
@given(boxes_xyxy(), image_side, image_side)
def test_inside_fraction_matches_clipped_area(boxes, w, h):
    frac = inside_fraction(boxes, w, h)
    assert ((frac >= 0) & (frac <= 1 + 1e-12)).all()
    inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 3] <= h) & valid_boxes(boxes)
    np.testing.assert_allclose(frac[inside], 1.0)
    np.testing.assert_allclose(frac * box_area(boxes), box_area(clip_boxes(boxes, w, h)), rtol=1e-9, atol=1e-6)


def test_valid_boxes_rejects_degenerate_and_nonfinite():
    boxes = np.array([[0, 0, 1, 1], [5, 5, 5, 9], [4, 4, 2, 8], [0, 0, np.nan, 3], [0, 0, np.inf, 3]])
    assert valid_boxes(boxes).tolist() == [True, False, False, False, False]


@relaxed
@given(st.lists(st.tuples(coord, coord), min_size=1, max_size=8))
def test_poly_to_hbb_encloses_every_vertex(points):
    pts = np.array(points)
    box = poly_to_hbb(pts.reshape(1, -1))[0]
    assert (pts[:, 0] >= box[0]).all() and (pts[:, 0] <= box[2]).all()
    assert (pts[:, 1] >= box[1]).all() and (pts[:, 1] <= box[3]).all()
    # tight: some vertex touches each side
    assert np.isclose(pts[:, 0].min(), box[0]) and np.isclose(pts[:, 1].max(), box[3])


@st.composite
def rotated_rects(draw):
    cx, cy = draw(coord), draw(coord)
    w, h = draw(st.floats(0.5, 400)), draw(st.floats(0.5, 400))
    a = draw(st.floats(0, np.pi))
    local = np.array([(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)])
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    return local @ rot + (cx, cy), w * h


@relaxed
@given(rotated_rects(), image_side, image_side)
def test_clip_polygon_area_bounds(rect_and_area, w, h):
    poly, area = rect_and_area
    assert np.isclose(polygon_area(poly), area, rtol=1e-6)
    clipped = clip_polygon(poly, 0, 0, w, h)
    if len(clipped):
        assert (clipped[:, 0] >= -1e-9).all() and (clipped[:, 0] <= w + 1e-9).all()
        assert (clipped[:, 1] >= -1e-9).all() and (clipped[:, 1] <= h + 1e-9).all()
    frac = polygon_inside_fraction(poly, 0, 0, w, h)
    assert 0 <= frac <= 1
    hbb = poly_to_hbb(poly.reshape(1, -1))[0]
    if hbb[0] >= 0 and hbb[1] >= 0 and hbb[2] <= w and hbb[3] <= h:
        assert np.isclose(frac, 1.0)


@settings(max_examples=200, deadline=None)
@given(boxes_xyxy(n_max=1).filter(lambda b: len(b) == 1 and valid_boxes(b)[0]), image_side, image_side)
def test_clip_polygon_of_axis_box_equals_clip_boxes(box, w, h):
    x1, y1, x2, y2 = box[0]
    poly = np.array([(x1, y1), (x2, y1), (x2, y2), (x1, y2)])
    expected = box_area(clip_boxes(box, w, h))[0]
    assert np.isclose(polygon_area(clip_polygon(poly, 0, 0, w, h)), expected, rtol=1e-9, atol=1e-6)


def test_polygon_fraction_is_not_the_box_fraction():
    # A diamond whose left corner pokes out of the window x >= 5: 87.5% of the polygon is inside,
    # but only 75% of its horizontal box; the 70% patch rule must use the polygon.
    diamond = np.array([(0, 10), (10, 0), (20, 10), (10, 20)], float)
    assert np.isclose(polygon_inside_fraction(diamond, 10, -5, 40, 40), 0.5)
    assert np.isclose(polygon_inside_fraction(diamond, 5, -5, 40, 40), 0.875)
    # the same window in the box's frame: x shifted by -5
    assert np.isclose(inside_fraction(np.array([[-5, 0, 15, 20]]), 35, 45)[0], 0.75)

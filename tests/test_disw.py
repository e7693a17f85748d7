"""DISW against the spec's formula: an independent per-box loop written here from shared/DS2D2.md is the oracle."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.ds2d2.disw import disw_weights

coord = st.floats(-20, 140, allow_nan=False, width=32)
box = st.tuples(coord, coord, st.floats(0, 90, width=32), st.floats(0, 90, width=32)).map(
    lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]
)
image_boxes = st.lists(box, max_size=12).map(lambda bs: torch.tensor(bs, dtype=torch.float32).reshape(-1, 4))


def spec_disw(boxes_per_image, grid_hw, padded_hw):
    """DS2D2.md, DISW: start at 1; per box c0 = max(0, floor(x1 s)), c1 = min(w - 1, ceil(x2 s)) (rows alike), add
    1 / ((c1 - c0 + 1)(r1 - r0 + 1)) to every cell of the inclusive range [r0..r1] x [c0..c1]."""
    h, w = grid_hw
    sx, sy = w / padded_hw[1], h / padded_hw[0]
    out = [[[1.0] * w for _ in range(h)] for _ in boxes_per_image]
    for i, boxes in enumerate(boxes_per_image):
        for x1, y1, x2, y2 in boxes.tolist():
            # the products in float32, as the boxes are float32 tensors (floor/ceil of a float64 product can differ)
            fx1, fy1, fx2, fy2 = (float(torch.tensor(v, dtype=torch.float32) * torch.tensor(s, dtype=torch.float32))
                                  for v, s in ((x1, sx), (y1, sy), (x2, sx), (y2, sy)))
            c0, c1 = max(0, math.floor(fx1)), min(w - 1, math.ceil(fx2))
            r0, r1 = max(0, math.floor(fy1)), min(h - 1, math.ceil(fy2))
            if c1 < c0 or r1 < r0:
                continue  # an empty range (the box lies right of or below the grid) covers nothing
            for r in range(r0, r1 + 1):
                for c in range(c0, c1 + 1):
                    out[i][r][c] += 1.0 / ((c1 - c0 + 1) * (r1 - r0 + 1))
    return torch.tensor(out).reshape(len(boxes_per_image), 1, h, w)


@settings(max_examples=80, deadline=None)
@given(
    boxes=st.lists(image_boxes, min_size=1, max_size=3),
    grid=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    padded=st.tuples(st.integers(32, 128), st.integers(32, 128)),
)
def test_equals_the_spec_formula(boxes, grid, padded):
    fast = disw_weights(boxes, grid, padded)
    assert fast.shape == (len(boxes), 1, *grid)
    torch.testing.assert_close(fast, spec_disw(boxes, grid, padded), rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(boxes=image_boxes, grid=st.tuples(st.integers(2, 16), st.integers(2, 16)))
def test_each_box_adds_exactly_one_unit_of_weight(boxes, grid):
    """Density independence: a box inside the grid adds 1 in total, however large it is."""
    inside = boxes[(boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= 128) & (boxes[:, 3] <= 128)]
    w = disw_weights([inside], grid, (128, 128))
    assert torch.isclose(w.sum() - grid[0] * grid[1], torch.tensor(float(len(inside))), atol=1e-3)
    assert (w >= 1).all()


def test_a_10px_box_on_a_stride_16_grid_spreads_over_4_cells():
    # the example: x 20..30 px -> cells floor(1.25)=1 .. ceil(1.875)=2 inclusive, rows alike -> 2 x 2 cells
    w = disw_weights([torch.tensor([[20.0, 20.0, 30.0, 30.0]])], (8, 8), (128, 128))[0, 0]
    assert torch.equal(w[1:3, 1:3], torch.full((2, 2), 1.25))
    assert w.sum() == 64 + 1


def test_small_boxes_weigh_more_than_large_ones():
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [64.0, 64.0, 128.0, 128.0]])]
    w = disw_weights(boxes, (16, 16), (128, 128))[0, 0]
    assert w[0, 0] == 1 + 1 / 4  # cells 0..1 per axis (ceil(8/8) = 1 is included)
    assert torch.isclose(w[12, 12], torch.tensor(1 + 1 / 64))  # cells 8..15 (ceil clipped to the last cell)
    assert w[5, 0] == 1.0  # background


def test_clustered_boxes_add_up_instead_of_diluting():
    two_same = [torch.tensor([[16.0, 16.0, 32.0, 32.0]] * 2)]
    w = disw_weights(two_same, (8, 8), (64, 64))[0, 0]
    assert torch.isclose(w[2, 2], torch.tensor(1 + 2 / 9))  # each box covers cells 2..4 per axis


def test_boxes_beyond_the_grid_and_images_without_boxes_keep_the_base_weight():
    # entirely right/below the image, and an image without boxes
    boxes = [torch.tensor([[200.0, 200.0, 300.0, 300.0]]), torch.zeros(0, 4)]
    assert torch.equal(disw_weights(boxes, (4, 4), (64, 64)), torch.ones(2, 1, 4, 4))
    assert torch.equal(disw_weights([torch.zeros(0, 4)], (3, 5), (64, 64)), torch.ones(1, 1, 3, 5))

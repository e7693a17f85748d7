"""DISW: the vectorised weights equal the per-box definition; small objects weigh more; odd boxes are harmless."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.ds2d2.disw import disw_weights, disw_weights_reference

coord = st.floats(-20, 140, allow_nan=False, width=32)
box = st.tuples(coord, coord, st.floats(0, 90, width=32), st.floats(0, 90, width=32)).map(
    lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]
)
image_boxes = st.lists(box, max_size=12).map(lambda bs: torch.tensor(bs, dtype=torch.float32).reshape(-1, 4))


@settings(max_examples=60, deadline=None)
@given(
    boxes=st.lists(image_boxes, min_size=1, max_size=3),
    grid=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    padded=st.tuples(st.integers(32, 128), st.integers(32, 128)),
)
def test_vectorised_equals_per_box_loop(boxes, grid, padded):
    fast = disw_weights(boxes, grid, padded)
    assert fast.shape == (len(boxes), 1, *grid)
    torch.testing.assert_close(fast, disw_weights_reference(boxes, grid, padded), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(fast).all() and (fast >= 1).all()


def test_small_boxes_weigh_more_than_large_ones():
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [64.0, 64.0, 128.0, 128.0]])]
    w = disw_weights(boxes, (16, 16), (128, 128))[0, 0]
    assert w[0, 0] == 2.0  # one cell covered -> +1
    assert torch.isclose(w[12, 12], torch.tensor(1 + 1 / 64))  # 8x8 cells covered
    assert w[5, 0] == 1.0  # background


def test_clustered_boxes_add_up_instead_of_diluting():
    two_same = [torch.tensor([[16.0, 16.0, 32.0, 32.0]] * 2)]
    w = disw_weights(two_same, (8, 8), (64, 64))[0, 0]
    assert torch.isclose(w[2, 2], torch.tensor(1 + 2 / 4))


def test_projection_floors_start_and_ceils_end():
    w = disw_weights([torch.tensor([[9.0, 0.0, 17.0, 8.0]])], (8, 8), (64, 64))[0, 0]
    assert (w[0, 1:3] == 1.5).all() and w[0, 0] == 1 and w[0, 3] == 1  # x 9..17 px -> cells 1..2 (floor 1, ceil 3)


def test_degenerate_outside_and_missing_boxes_leave_the_base_weight():
    # zero width on a cell border, entirely right/below, entirely left/above the image; and an image without boxes
    boxes = [torch.tensor([[16.0, 16.0, 16.0, 32.0], [200.0, 200.0, 300.0, 300.0], [-50.0, -50.0, -10.0, -10.0]]),
             torch.zeros(0, 4)]
    assert torch.equal(disw_weights(boxes, (4, 4), (64, 64)), torch.ones(2, 1, 4, 4))
    assert torch.equal(disw_weights([torch.zeros(0, 4)], (3, 5), (64, 64)), torch.ones(1, 1, 3, 5))

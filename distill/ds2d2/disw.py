"""DISW, the density-independent scale weight: 1 everywhere plus 1/area of every ground-truth box it covers."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _project(boxes: Tensor, grid_hw: Sequence[int], padded_input_hw: Sequence[int]) -> Tensor:
    # Box -> integer cell range [x1, x2) x [y1, y2) on the grid: x1/y1 floored, x2/y2 ceiled, clipped to the grid.
    h, w = grid_hw
    scale = torch.tensor([w / padded_input_hw[1], h / padded_input_hw[0]] * 2, device=boxes.device)
    scaled = boxes.float() * scale
    cells = torch.cat([scaled[:, :2].floor(), scaled[:, 2:].ceil()], dim=1)
    limit = cells.new_tensor([w, h, w, h])
    return torch.minimum(cells.clamp(min=0), limit).long()


def disw_weights(boxes_per_image: Sequence[Tensor], grid_hw: Sequence[int], padded_input_hw: Sequence[int]) -> Tensor:
    """DISW (B,1,h,w) for xyxy boxes in input pixels, built without a loop over boxes.

    Each box contributes the outer product of its row and column indicator vectors times 1/#cells; summing those
    products over the boxes of an image is one einsum. Boxes covering no cell (degenerate or outside) add nothing.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    batch = len(boxes_per_image)
    device = boxes_per_image[0].device if batch else torch.device("cpu")
    weights = torch.ones(batch, 1, h, w, device=device)
    counts = torch.tensor([len(b) for b in boxes_per_image], device=device)
    if batch == 0 or int(counts.sum()) == 0:
        return weights
    cells = _project(torch.cat([b.reshape(-1, 4) for b in boxes_per_image]).to(device), (h, w), padded_input_hw)
    x1, y1, x2, y2 = cells.unbind(1)
    area = ((x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)).float()
    value = torch.where(area > 0, 1.0 / area.clamp(min=1), torch.zeros_like(area))
    cols = torch.arange(w, device=device)
    rows = torch.arange(h, device=device)
    in_x = ((cols >= x1[:, None]) & (cols < x2[:, None])).float()  # (N, w)
    in_y = ((rows >= y1[:, None]) & (rows < y2[:, None])).float()  # (N, h)
    image_of_box = torch.repeat_interleave(torch.arange(batch, device=device), counts)
    per_image = torch.zeros(batch, len(value), device=device)
    per_image[image_of_box, torch.arange(len(value), device=device)] = value  # (B, N): each box's value in its image
    weights[:, 0] += torch.einsum("bn,nh,nw->bhw", per_image, in_y, in_x)
    return weights


def disw_weights_reference(
    boxes_per_image: Sequence[Tensor], grid_hw: Sequence[int], padded_input_hw: Sequence[int]
) -> Tensor:
    """The same weights with a plain loop over boxes: the readable definition, used by tests and the benchmark."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    device = boxes_per_image[0].device if len(boxes_per_image) else torch.device("cpu")
    weights = torch.ones(len(boxes_per_image), 1, h, w, device=device)
    for i, boxes in enumerate(boxes_per_image):
        for x1, y1, x2, y2 in _project(boxes.reshape(-1, 4), (h, w), padded_input_hw).tolist():
            if x2 > x1 and y2 > y1:
                weights[i, 0, y1:y2, x1:x2] += 1.0 / ((x2 - x1) * (y2 - y1))
    return weights

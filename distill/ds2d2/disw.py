"""DISW, the density-independent scale weight: 1 everywhere plus 1/(cell count) of every ground-truth box it covers.

A box (xyxy, padded-input pixels) covers the inclusive cell range [r0..r1] x [c0..c1] of the (h, w) grid with
c0 = max(0, floor(x1 * w / W_in)), c1 = min(w - 1, ceil(x2 * w / W_in)) and rows alike, as the reference's
`transform_bboxes` (`fg_weight[..., y0:y1+1, x0:x1+1] += 1/((x1-x0+1)(y1-y0+1))`). A box whose range is empty
(entirely right of or below the grid) adds nothing. The reference accumulates in float16; this is float32.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def cell_ranges(boxes: Tensor, grid_hw: Sequence[int], padded_input_hw: Sequence[int]) -> Tensor:
    """(N, 4) integer inclusive cell ranges (c0, r0, c1, r1) of xyxy boxes on the grid, clipped to it."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    scale = torch.tensor([w / padded_input_hw[1], h / padded_input_hw[0]] * 2, device=boxes.device)
    scaled = boxes.reshape(-1, 4).float() * scale
    start = scaled[:, :2].floor().clamp(min=0)
    end = torch.minimum(scaled[:, 2:].ceil(), scaled.new_tensor([w - 1, h - 1]))
    return torch.cat([start, end], dim=1).long()


def disw_weights(boxes_per_image: Sequence[Tensor], grid_hw: Sequence[int], padded_input_hw: Sequence[int]) -> Tensor:
    """DISW (B,1,h,w) for xyxy boxes in padded-input pixels, built without a loop over boxes.

    Each box contributes the outer product of its row and column indicator vectors times 1/#cells; summing those
    products over the boxes of an image is one einsum.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    batch = len(boxes_per_image)
    device = boxes_per_image[0].device if batch else torch.device("cpu")
    weights = torch.ones(batch, 1, h, w, device=device)
    counts = torch.tensor([b.reshape(-1, 4).shape[0] for b in boxes_per_image], device=device)
    if batch == 0 or int(counts.sum()) == 0:
        return weights
    boxes = torch.cat([b.reshape(-1, 4) for b in boxes_per_image]).to(device)
    c0, r0, c1, r1 = cell_ranges(boxes, (h, w), padded_input_hw).unbind(1)
    cells = ((c1 - c0 + 1).clamp(min=0) * (r1 - r0 + 1).clamp(min=0)).float()
    value = torch.where(cells > 0, 1.0 / cells.clamp(min=1), torch.zeros_like(cells))
    cols, rows = torch.arange(w, device=device), torch.arange(h, device=device)
    in_x = ((cols >= c0[:, None]) & (cols <= c1[:, None])).float()  # (N, w)
    in_y = ((rows >= r0[:, None]) & (rows <= r1[:, None])).float()  # (N, h)
    image_of_box = torch.repeat_interleave(torch.arange(batch, device=device), counts)
    per_image = torch.zeros(batch, len(value), device=device)
    per_image[image_of_box, torch.arange(len(value), device=device)] = value  # (B, N): each box's value in its image
    weights[:, 0] += torch.einsum("bn,nh,nw->bhw", per_image, in_y, in_x)
    return weights


def disw_weights_reference(boxes_per_image: Sequence[Tensor], grid_hw: Sequence[int], padded_input_hw: Sequence[int]
                      ) -> Tensor:
    """The same weights with a loop over boxes, as the reference builds them (benchmarks.distill_cost times both)."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    device = boxes_per_image[0].device if len(boxes_per_image) else torch.device("cpu")
    weights = torch.ones(len(boxes_per_image), 1, h, w, device=device)
    for i, boxes in enumerate(boxes_per_image):
        for c0, r0, c1, r1 in cell_ranges(boxes, (h, w), padded_input_hw).tolist():
            if c1 >= c0 and r1 >= r0:
                weights[i, 0, r0:r1 + 1, c0:c1 + 1] += 1.0 / ((c1 - c0 + 1) * (r1 - r0 + 1))
    return weights


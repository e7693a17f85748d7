"""RetinaNet anchors in numpy, equal to torchvision's ``AnchorGenerator`` for a ResNet + FPN (P3-P7) backbone.

Reproduced details (they change boxes by whole pixels when missed): base anchors are computed in float32 and rounded
half-to-even; feature maps have ceil(S / stride) cells, as ResNet's stride-2 convolutions with padding give; and the
shift between cells is ``input_size // cells``, torchvision's effective stride, which is not always the nominal one
(e.g. 800 px at P6: 13 cells, shift 61, not 64).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

RETINANET_STRIDES = (8, 16, 32, 64, 128)  # P3..P7
RPN_STRIDES = (4, 8, 16, 32, 64)  # Faster R-CNN P2..P6
DEFAULT_LEVELS = {"retinanet": (3, 7), "faster_rcnn": (2, 6)}  # (finest, coarsest) FPN level P_l, stride 2^l


def level_strides(arch: str, levels: tuple[int, int] | list[int] | None = None) -> tuple[int, ...]:
    """Strides 2^l of the FPN levels P_min..P_max of a detector (default: the arch's reference levels)."""
    if arch not in DEFAULT_LEVELS:
        raise ValueError(f"no anchors for arch {arch!r}; known: {sorted(DEFAULT_LEVELS)}")
    low, high = levels or DEFAULT_LEVELS[arch]
    return tuple(2**level for level in range(low, high + 1))


def retinanet_default_sizes() -> tuple[tuple[int, ...], ...]:
    """torchvision's RetinaNet sizes: (x, int(x * 2^(1/3)), int(x * 2^(2/3))) for x in 32..512 (int truncates)."""
    return tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))


def reference_sizes(arch: str, levels: tuple[int, int] | list[int] | None = None) -> tuple[tuple[float, ...], ...]:
    """The DS2D2 reference's anchor sizes per level: RetinaNet 4 x stride x 2^(i/3) (i = 0, 1, 2, MMDetection's
    octave_base_scale 4, 3 scales per octave); the Faster R-CNN RPN one size 8 x stride."""
    strides = level_strides(arch, levels)
    if arch == "retinanet":
        return tuple(tuple(4 * s * 2 ** (i / 3) for i in range(3)) for s in strides)
    return tuple((8.0 * s,) for s in strides)


class AnchorSpec(BaseModel):
    """Anchor sizes per level, aspect ratios (height / width) and nominal strides; written into the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sizes: tuple[tuple[float, ...], ...] = Field(default_factory=retinanet_default_sizes)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    strides: tuple[int, ...] = RETINANET_STRIDES
    rounded: bool = True  # torchvision rounds base anchors to whole pixels; MMDetection (imported checkpoints) does not

    @model_validator(mode="after")
    def _consistent(self) -> "AnchorSpec":
        if len(self.sizes) != len(self.strides):
            raise ValueError(f"{len(self.sizes)} size levels but {len(self.strides)} strides")
        if any(len(s) != len(self.sizes[0]) for s in self.sizes):
            raise ValueError("every level needs the same number of sizes (the head predicts a fixed count)")
        if min(min(s) for s in self.sizes) <= 0 or min(self.aspect_ratios) <= 0 or min(self.strides) <= 0:
            raise ValueError("sizes, aspect_ratios and strides must be positive")
        return self

    @property
    def num_anchors_per_location(self) -> int:
        """Anchors per feature-map cell (the head's A)."""
        return len(self.sizes[0]) * len(self.aspect_ratios)


def anchor_spec_for(arch: str, anchors=None, levels: tuple[int, int] | list[int] | None = None) -> AnchorSpec:
    """The AnchorSpec of a detector: its ModelSpec's `anchors` (sizes per level, aspect ratios) or the reference's,
    on its FPN levels (`fpn_levels`, default the arch's)."""
    strides = level_strides(arch, levels)
    if anchors is None:
        return AnchorSpec(sizes=reference_sizes(arch, levels), aspect_ratios=(0.5, 1.0, 2.0), strides=strides)
    return AnchorSpec(sizes=tuple(tuple(float(x) for x in level) for level in anchors.sizes),
                      aspect_ratios=tuple(float(r) for r in anchors.aspect_ratios), strides=strides)


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...], rounded: bool = True) -> np.ndarray:
    """Zero-centred xyxy base anchors (len(ratios) * len(sizes), 4), ratio-major, float32, rounded like torchvision."""
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
    return np.round(base) if rounded else base  # np.round is half-to-even, as torch


def feature_sizes(input_size: tuple[int, int], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """Feature-map (height, width) per level: ceil(S / stride), what ResNet + FPN (+ P6/P7 convs) produce."""
    return [(math.ceil(input_size[0] / s), math.ceil(input_size[1] / s)) for s in strides]


@lru_cache(maxsize=16)
def _anchors_cached(spec: AnchorSpec, input_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, ...]]:
    levels = []
    for (grid_h, grid_w), sizes in zip(feature_sizes(input_size, spec.strides), spec.sizes):
        stride_h, stride_w = input_size[0] // grid_h, input_size[1] // grid_w
        shift_x = np.arange(grid_w, dtype=np.int32) * stride_w
        shift_y = np.arange(grid_h, dtype=np.int32) * stride_h
        sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], axis=1).astype(np.float32)
        base = cell_anchors(tuple(sizes), spec.aspect_ratios, spec.rounded)
        # Order (cell row, cell column, anchor) is the order of the head's flattened outputs.
        levels.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    anchors = np.concatenate(levels)
    anchors.setflags(write=False)  # shared through the cache
    return anchors, tuple(len(a) for a in levels)


def generate_anchors(spec: AnchorSpec, input_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """All anchors (sum of levels, 4) float32 xyxy for a (height, width) input, and the anchor count per level."""
    return _anchors_cached(spec, (int(input_size[0]), int(input_size[1])))

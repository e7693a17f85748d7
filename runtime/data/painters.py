"""Painters for synthetic remote-sensing targets (numpy + cv2) and the canvas they draw on.

Each class has a consistent look so that a small detector can learn it from a few hundred images:
vehicle = small bright rectangle with a dark windshield (rows on roads, dense parking lots); storagetank = pale
disc with a rim and a shadow (clusters); airplane = pale cross-shaped polygon at any angle (on aprons);
ship = pointed hull on water, parallel to the shore; tenniscourt = green/blue court with white lines (groups);
basketballcourt = tan court; groundtrackfield = red running track around a green field; baseballfield = green fan
with a brown diamond. The scene layout (ground, roads, water, groups, distractors) is in runtime.data.scene.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

SHIFT = 4  # cv2 fixed-point bits: sub-pixel polygon vertices keep small objects' shapes
SCALE = 1 << SHIFT

# Longest side in pixels (at object_scale 1) of each class the generator can paint.
SIZES: dict[str, tuple[float, float]] = {
    "vehicle": (7, 15), "storagetank": (8, 40), "airplane": (12, 56), "ship": (10, 52),
    "tenniscourt": (14, 48), "basketballcourt": (14, 40), "groundtrackfield": (56, 120), "baseballfield": (36, 80),
}
SUPPORTED_CLASSES: tuple[str, ...] = tuple(SIZES)

VEHICLE_COLORS = np.array([(230, 230, 228), (190, 192, 198), (200, 45, 40), (40, 70, 175), (235, 200, 60)], float)
TERRAINS = np.array([(96, 124, 72), (150, 140, 104), (128, 110, 86), (124, 124, 118)], float)
ROOF_COLORS = np.array([(150, 72, 52), (92, 92, 96), (176, 160, 130), (120, 60, 45), (70, 74, 70)], float)


@dataclass
class Canvas:
    """The image being painted plus masks of what lies where (objects, water, roads)."""

    size: int
    img: np.ndarray = field(init=False)
    occupied: np.ndarray = field(init=False)
    water: np.ndarray = field(init=False)
    road: np.ndarray = field(init=False)
    objects: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.size
        self.img = np.zeros((s, s, 3), np.uint8)
        self.occupied = np.zeros((s, s), bool)
        self.water = np.zeros((s, s), bool)
        self.road = np.zeros((s, s), bool)

    def fits(self, box: tuple[int, int, int, int], on: str = "land", margin: int = 1) -> bool:
        """Box inside the image, over no other object, and on land / dry (land or road) / water / road as asked."""
        x1, y1, x2, y2 = box
        if x1 < margin or y1 < margin or x2 > self.size - margin or y2 > self.size - margin or x2 <= x1 or y2 <= y1:
            return False
        sl = np.s_[y1:y2, x1:x2]
        if self.occupied[sl].any():
            return False
        if on == "water":
            return bool(self.water[sl].all())
        if on == "road":
            return bool(self.road[sl].mean() > 0.9)
        if on == "dry":
            return not self.water[sl].any()
        return not self.water[sl].any() and not self.road[sl].any() if on == "land" else True

    def claim(self, box: tuple[int, int, int, int], pad: int = 1) -> None:
        """Mark a box (plus a small margin) as taken, so later objects do not overlap it."""
        x1, y1, x2, y2 = box
        self.occupied[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad] = True

    def poly(self, pts: np.ndarray, color: Sequence[float]) -> None:
        """Fill a polygon with sub-pixel, anti-aliased edges."""
        cv2.fillPoly(self.img, [np.round(pts * SCALE).astype(np.int32)], _c(color), cv2.LINE_AA, SHIFT)

    def lines(self, segments: Sequence[np.ndarray], color: Sequence[float], thickness: int = 1) -> None:
        """Draw open polylines (court lines, stripes, road markings)."""
        pts = [np.round(s * SCALE).astype(np.int32) for s in segments]
        cv2.polylines(self.img, pts, False, _c(color), thickness, cv2.LINE_AA, SHIFT)

    def disc(self, center: np.ndarray, radius: float, color: Sequence[float], thickness: int = -1) -> None:
        """A filled disc (thickness -1) or a circle outline."""
        c = tuple(int(v) for v in np.round(np.asarray(center) * SCALE))
        cv2.circle(self.img, c, int(round(radius * SCALE)), _c(color), thickness, cv2.LINE_AA, SHIFT)

    def shade(self, pts: np.ndarray, factor: float) -> None:
        """Darken the pixels under a polygon (shadows), touching only its bounding region."""
        x1, y1 = np.maximum(np.floor(pts.min(0)).astype(int), 0)
        x2, y2 = np.minimum(np.ceil(pts.max(0)).astype(int) + 1, self.size)
        if x2 <= x1 or y2 <= y1:
            return
        mask = np.zeros((y2 - y1, x2 - x1), np.uint8)
        cv2.fillPoly(mask, [np.round((pts - (x1, y1)) * SCALE).astype(np.int32)], 255, cv2.LINE_AA, SHIFT)
        roi = self.img[y1:y2, x1:x2].astype(np.float32)
        alpha = mask[..., None].astype(np.float32) / 255.0
        self.img[y1:y2, x1:x2] = (roi * (1 - alpha * (1 - factor))).astype(np.uint8)

    def record(self, name: str, pts: np.ndarray) -> tuple[int, int, int, int]:
        """Register an annotated object by the box of its outline and mark it occupied."""
        box = hbb(pts)
        self.objects.append((name, box))
        self.claim(box)
        return box


def _c(color: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(min(255.0, max(0.0, float(v)))) for v in color)


def hbb(pts: np.ndarray) -> tuple[int, int, int, int]:
    """Integer horizontal box of polygon points (rounded to the nearest pixel edge)."""
    lo, hi = np.round(pts.min(0)).astype(int), np.round(pts.max(0)).astype(int)
    return int(lo[0]), int(lo[1]), int(max(hi[0], lo[0] + 1)), int(max(hi[1], lo[1] + 1))


def place(local: np.ndarray, center: Sequence[float], angle: float) -> np.ndarray:
    """Rotate local (K, 2) points by `angle` (radians) and move them to `center`."""
    c, s = np.cos(angle), np.sin(angle)
    return local @ np.array([[c, s], [-s, c]]) + np.asarray(center, float)


def rect(length: float, width: float) -> np.ndarray:
    """Corners of a length x width rectangle centred at 0, long side along x."""
    x, y = length / 2, width / 2
    return np.array([(-x, -y), (x, -y), (x, y), (-x, y)])


# ---------------------------------------------------------------- targets (each returns True when painted)

def vehicle(cv: Canvas, rng: np.random.Generator, center, length: float, angle: float, on: str = "any") -> bool:
    """A car seen from above: bright body, dark windshield towards the front, shadow."""
    width = max(2.6, 0.45 * length)
    body = place(rect(length, width), center, angle)
    if not cv.fits(hbb(body), on=on):
        return False
    color = VEHICLE_COLORS[rng.integers(len(VEHICLE_COLORS))] + rng.normal(0, 6, 3)
    cv.shade(body + 0.35 * width, 0.55)
    cv.poly(body, color)
    shield = place(rect(0.16 * length, 0.8 * width) + (0.2 * length, 0), center, angle)
    cv.poly(shield, color * 0.3)
    cv.record("vehicle", body)
    return True


def storagetank(cv: Canvas, rng: np.random.Generator, center, diameter: float) -> bool:
    """A pale disc with a darker roof ring, a rim and a shadow to the lower right."""
    r = diameter / 2
    circle = np.asarray(center, float) + np.array([(-r, -r), (r, r)])
    if not cv.fits(hbb(circle)):
        return False
    cv.disc(np.asarray(center) + 0.18 * diameter, r, (35, 35, 35))
    tone = 228 + rng.normal(0, 6)
    cv.disc(center, r, (tone, tone, tone - 8))
    cv.disc(center, 0.72 * r, (tone - 22, tone - 22, tone - 28))
    cv.disc(center, r, (120, 120, 118), 1)
    cv.record("storagetank", circle)
    return True


_PLANE = [  # local shapes of an airplane of length 1, nose at +x
    np.array([(0.5, 0), (0.42, 0.05), (-0.44, 0.04), (-0.5, 0), (-0.44, -0.04), (0.42, -0.05)]),
    np.array([(0.12, 0.04), (-0.1, 0.48), (-0.2, 0.48), (-0.08, 0.04)]),
    np.array([(0.12, -0.04), (-0.1, -0.48), (-0.2, -0.48), (-0.08, -0.04)]),
    np.array([(-0.35, 0.03), (-0.45, 0.18), (-0.5, 0.18), (-0.47, 0.0), (-0.5, -0.18), (-0.45, -0.18), (-0.35, -0.03)]),
]


def airplane(cv: Canvas, rng: np.random.Generator, center, length: float, angle: float) -> bool:
    """A pale fuselage, swept wings and tail, with a shadow; the box covers all parts."""
    parts = [place(p * length, center, angle) for p in _PLANE]
    allpts = np.concatenate(parts)
    if not cv.fits(hbb(allpts), on="any"):
        return False
    tone = rng.uniform(205, 240)
    for p in parts:
        cv.shade(p + 0.1 * length, 0.55)
    for p in parts:
        cv.poly(p, (tone, tone, tone + 4))
    cv.record("airplane", allpts)
    return True


def ship(cv: Canvas, rng: np.random.Generator, center, length: float, angle: float) -> bool:
    """A pointed pale hull with a grey superstructure, entirely on water; sometimes a wake."""
    w = 0.24
    hull_local = np.array([(0.5, 0), (0.28, w / 2), (-0.5, w / 2), (-0.5, -w / 2), (0.28, -w / 2)]) * length
    hull = place(hull_local, center, angle)
    if not cv.fits(hbb(hull), on="water"):
        return False
    if rng.random() < 0.4:  # a wake behind a moving ship: bright water, not part of the object
        wake = place(np.array([(-0.5, 0.1), (-1.1, 0.3), (-1.1, -0.3), (-0.5, -0.1)]) * length, center, angle)
        cv.poly(wake, (110, 140, 150))
    tone = rng.uniform(200, 235)
    cv.poly(hull, (tone, tone, tone))
    cv.poly(place(rect(0.25 * length, 0.6 * w * length) - (0.22 * length, 0), center, angle), (110, 110, 115))
    cv.record("ship", hull)
    return True


def court(cv: Canvas, rng: np.random.Generator, name: str, center, length: float, angle: float) -> bool:
    """tenniscourt (green or blue, net + service lines) or basketballcourt (tan, centre circle)."""
    width = (0.5 if name == "tenniscourt" else 0.56) * length
    outer = place(rect(length, width), center, angle)
    if not cv.fits(hbb(outer)):
        return False
    white = (240, 240, 240)
    if name == "tenniscourt":
        surround, inner = [((58, 118, 72), (72, 152, 92)), ((52, 96, 72), (62, 104, 168))][rng.integers(2)]
        cv.poly(outer, surround)
        ib = place(rect(0.78 * length, 0.66 * width), center, angle)
        cv.poly(ib, inner)
        cv.lines([np.vstack([ib, ib[:1]])], white)
        net = place(np.array([(0, -0.4 * width), (0, 0.4 * width)]), center, angle)
        serve = [place(np.array([(x, -0.33 * width), (x, 0.33 * width)]), center, angle)
                 for x in (-0.2 * length, 0.2 * length)]
        cv.lines([net, *serve], white)
    else:
        cv.poly(outer, (196, 130, 82) if rng.random() < 0.7 else (178, 86, 72))
        midline = place(np.array([(0, -width / 2), (0, width / 2)]), center, angle)
        cv.lines([np.vstack([outer, outer[:1]]), midline], white)
        cv.disc(center, 0.12 * length, white, 1)
    cv.record(name, outer)
    return True


def groundtrackfield(cv: Canvas, rng: np.random.Generator, center, length: float, angle: float) -> bool:
    """A red running track (stadium shape) around a green field."""
    def stadium(l: float, r: float) -> np.ndarray:
        t = np.linspace(-np.pi / 2, np.pi / 2, 16)
        right = np.stack([l / 2 - r + r * np.cos(t), r * np.sin(t)], 1)
        return np.vstack([right, -right])
    width = 0.52 * length
    outer = place(stadium(length, width / 2), center, angle)
    if not cv.fits(hbb(outer)):
        return False
    cv.poly(outer, (172, 78, 60) + rng.normal(0, 5, 3))
    inner = place(stadium(length - 0.2 * width, 0.4 * width), center, angle)
    cv.poly(inner, (74, 142, 72))
    cv.lines([np.vstack([inner, inner[:1]])], (235, 235, 235))
    cv.record("groundtrackfield", outer)
    return True


def baseballfield(cv: Canvas, rng: np.random.Generator, center, length: float, angle: float) -> bool:
    """A green 90-degree fan with a brown infield diamond and white foul lines."""
    r = length / np.sqrt(2)  # a 90 degree fan whose chord is `length`
    t = np.linspace(-np.pi / 4, np.pi / 4, 14)
    fan_local = np.vstack([[(-r / 2, 0)], np.stack([r * np.cos(t) - r / 2, r * np.sin(t)], 1)])
    fan = place(fan_local, center, angle)
    if not cv.fits(hbb(fan)):
        return False
    cv.poly(fan, (84, 140, 70))
    d = 0.3 * r
    diamond = np.array([(-r / 2, 0), (-r / 2 + d / np.sqrt(2), d / np.sqrt(2)), (-r / 2 + d * np.sqrt(2), 0),
                        (-r / 2 + d / np.sqrt(2), -d / np.sqrt(2))])
    cv.poly(place(diamond, center, angle), (176, 126, 84))
    cv.lines([fan[[1, 0, -1]]], (235, 235, 235))
    cv.record("baseballfield", fan)
    return True

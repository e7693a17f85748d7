"""Lay out one synthetic remote-sensing scene: ground, water, roads, groups of targets, distractors.

Scenes are painted with the shore at the top and then rotated / mirrored by a random multiple of 90 degrees,
so every layout appears in all orientations and boxes stay exact. All randomness comes from the one Generator
passed in, which is what makes the generator deterministic.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from runtime.data import painters as P
from runtime.data.painters import ROOF_COLORS, SIZES, TERRAINS, Canvas, place, rect

Box = tuple[int, int, int, int]


@dataclass
class SceneSpec:
    """What to paint: image size, classes, object count, dense or not, size and distractor settings."""

    size: int
    classes: Sequence[str]
    n_objects: int
    dense: bool
    small_fraction: float
    object_scale: float
    n_distractors: int


@dataclass
class Layout:
    """Where roads and the shoreline are, for placing vehicles and ships."""

    roads: list[tuple[np.ndarray, float, float]]  # (centre, angle, width)
    shore: np.ndarray | None  # water depth (y of the shoreline) for each x, water at the top


def sample_length(rng: np.random.Generator, name: str, spec: SceneSpec) -> float:
    """Longest side for an object; with probability small_fraction drawn below 16 px when the class allows it."""
    lo, hi = (v * spec.object_scale for v in SIZES[name])
    if lo < 15.5 and hi >= 16:
        lo, hi = (lo, 15.5) if rng.random() < spec.small_fraction else (16.0, hi)
    return float(rng.uniform(lo, hi))


def render_scene(rng: np.random.Generator, spec: SceneSpec) -> tuple[np.ndarray, list[tuple[str, Box]]]:
    """Paint a scene; returns the uint8 RGB image and its (class name, xyxy box) objects."""
    cv = Canvas(spec.size)
    _ground(cv, rng)
    want_water = "ship" in spec.classes and rng.random() < 0.75
    layout = Layout(roads=[], shore=_water(cv, rng) if want_water else None)
    if "vehicle" in spec.classes or rng.random() < 0.4:
        layout.roads = _roads(cv, rng)
    n_buildings = spec.n_distractors // 2
    for _ in range(n_buildings):
        _building(cv, rng)
    if spec.dense:
        _dense_fill(cv, rng, spec, layout)
    classes = list(spec.classes)
    have = np.array([sum(name == c for name, _ in cv.objects) for c in classes], float)
    for _ in range(40 + 2 * spec.n_objects):
        if len(cv.objects) >= spec.n_objects:
            break
        # Favour classes the scene has few of, so big groups (parking rows) do not crowd out the rare classes.
        weights = 1.0 / (1.0 + have)
        pick = int(rng.choice(len(classes), p=weights / weights.sum()))
        before = len(cv.objects)
        _group(cv, rng, classes[pick], spec, layout, spec.n_objects - before)
        have[pick] += len(cv.objects) - before
    for _ in range(spec.n_distractors - n_buildings):
        (_trees if rng.random() < 0.6 else _free_shadow)(cv, rng)
    img = cv2.GaussianBlur(cv.img, (3, 3), 0.6)
    img = np.clip(img + 3 * rng.standard_normal(img.shape, dtype=np.float32), 0, 255).astype(np.uint8)
    return _orient(img, cv.objects, int(rng.integers(4)), bool(rng.random() < 0.5))


def _orient(
    img: np.ndarray, objects: list[tuple[str, Box]], k: int, mirror: bool
) -> tuple[np.ndarray, list[tuple[str, Box]]]:
    s = img.shape[0]
    out = []
    for name, (x1, y1, x2, y2) in objects:
        for _ in range(k):  # np.rot90 (counter-clockwise): (x, y) -> (y, s - x)
            x1, y1, x2, y2 = y1, s - x2, y2, s - x1
        if mirror:
            x1, x2 = s - x2, s - x1
        out.append((name, (x1, y1, x2, y2)))
    img = np.rot90(img, k)
    return np.ascontiguousarray(img[:, ::-1] if mirror else img), out


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    grid = rng.normal(0, 1, (cells, cells, channels)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).reshape(size, size, channels)


def _ground(cv: Canvas, rng: np.random.Generator) -> None:
    s = cv.size
    base = TERRAINS[rng.integers(len(TERRAINS))]
    tex = base.astype(np.float32) + 9 * _smooth_noise(rng, s, 6, 3) + 12 * _smooth_noise(rng, s, 14)
    tex += 4 * rng.standard_normal((s, s, 1), dtype=np.float32)
    cv.img[:] = np.clip(tex, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 5))):  # fields with crop rows
        length, width = rng.uniform(0.25, 0.75) * s, rng.uniform(0.15, 0.5) * s
        centre, angle = rng.uniform(0, s, 2), rng.uniform(0, np.pi)
        color = base + rng.normal(0, 20, 3)
        cv.poly(place(rect(length, width), centre, angle), color)
        step = rng.uniform(3, 7)
        offsets = np.arange(-width / 2 + step / 2, width / 2, step)
        rows = [place(np.array([(-length / 2, y), (length / 2, y)]), centre, angle) for y in offsets]
        cv.lines(rows, color * 0.85)


def _water(cv: Canvas, rng: np.random.Generator) -> np.ndarray:
    s = cv.size
    x = np.arange(s)
    depth = rng.uniform(0.22, 0.42) * s
    shore = depth + 0.06 * s * np.sin(2 * np.pi * x / (s * rng.uniform(0.6, 1.6)) + rng.uniform(0, 6.3))
    shore += 0.02 * s * np.sin(2 * np.pi * x / (s * rng.uniform(0.15, 0.3)) + rng.uniform(0, 6.3))
    yy = np.arange(s)[:, None]
    cv.water[:] = yy < shore[None, :]
    sand = (yy < shore[None, :] + 3) & ~cv.water
    colour = np.array((38, 68, 92), np.float32) + 6 * _smooth_noise(rng, s, 8, 3)
    cv.img[cv.water] = np.clip(colour[cv.water], 0, 255).astype(np.uint8)
    cv.img[sand] = (176, 168, 132)
    return shore


def _roads(cv: Canvas, rng: np.random.Generator) -> list[tuple[np.ndarray, float, float]]:
    s = cv.size
    roads = []
    for _ in range(int(rng.integers(1, 3))):
        angle = float(rng.choice([0.0, np.pi / 2])) if rng.random() < 0.75 else float(rng.uniform(0, np.pi))
        width = float(rng.uniform(12, 20))
        centre = np.array([rng.uniform(0.15, 0.85) * s, rng.uniform(0.45, 0.9) * s])
        body = place(rect(3 * s, width), centre, angle)
        cv.poly(body, np.full(3, rng.uniform(88, 108)))
        mask = np.zeros((s, s), np.uint8)
        cv2.fillPoly(mask, [np.round(body * P.SCALE).astype(np.int32)], 1, cv2.LINE_8, P.SHIFT)
        cv.road |= mask.astype(bool)
        dashes = [place(np.array([(t, 0.0), (t + 4, 0.0)]), centre, angle) for t in np.arange(-1.5 * s, 1.5 * s, 10)]
        cv.lines(dashes, (215, 215, 200))
        roads.append((centre, angle, width))
    return roads


def _find_spot(cv: Canvas, rng: np.random.Generator, w: float, h: float, on: str = "land", tries: int = 25):
    """Top-left corner of a free w x h area, or None."""
    for _ in range(tries):
        x0, y0 = rng.uniform(2, max(3.0, cv.size - w - 2)), rng.uniform(2, max(3.0, cv.size - h - 2))
        if cv.fits((int(x0), int(y0), int(np.ceil(x0 + w)), int(np.ceil(y0 + h))), on=on):
            return float(x0), float(y0)
    return None


def _group(cv: Canvas, rng: np.random.Generator, name: str, spec: SceneSpec, layout: Layout, want: int) -> None:
    s = cv.size
    centre = rng.uniform(0.05, 0.95, 2) * s
    if name == "vehicle":
        if layout.roads and rng.random() < 0.6:
            road = layout.roads[rng.integers(len(layout.roads))]
            _road_vehicles(cv, rng, road, spec, min(want, int(rng.integers(3, 13))))
        else:
            _parking_lot(cv, rng, spec, min(want, int(rng.integers(4, 17))))
    elif name == "storagetank":
        _tank_cluster(cv, rng, spec, min(want, int(rng.integers(1, 10))))
    elif name == "airplane":
        _apron(cv, rng, spec, min(want, int(rng.integers(1, 5))))
    elif name == "ship":
        if layout.shore is not None:
            _shore_ships(cv, rng, spec, layout.shore, min(want, int(rng.integers(2, 8))))
    elif name in ("tenniscourt", "basketballcourt"):
        length, angle, n = sample_length(rng, name, spec), _angle(rng), min(want, int(rng.integers(1, 5)))
        step = place(np.array([[0.0, (0.53 if name == "tenniscourt" else 0.6) * length]]), (0, 0), angle)[0]
        extent = length + n * 0.6 * length  # a square that holds the row of courts at any angle
        spot = _find_spot(cv, rng, extent, extent)
        first = np.array(spot) + extent / 2 - (n - 1) / 2 * step if spot is not None else centre
        for i in range(n):
            P.court(cv, rng, name, first + i * step, length, angle)
    else:
        length = sample_length(rng, name, spec)
        spot = _find_spot(cv, rng, length, length)
        getattr(P, name)(cv, rng, np.array(spot) + length / 2 if spot is not None else centre, length, _angle(rng))


def _angle(rng: np.random.Generator) -> float:
    """Mostly grid-aligned, like man-made structures; sometimes any angle."""
    return float(rng.choice([0.0, np.pi / 2])) if rng.random() < 0.6 else float(rng.uniform(0, np.pi))


def _road_vehicles(cv: Canvas, rng: np.random.Generator, road, spec: SceneSpec, want: int) -> None:
    centre, angle, width = road
    u, n = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    placed = 0
    for lane, heading in ((-width / 4, angle), (width / 4, angle + np.pi)):
        t = -1.5 * cv.size + rng.uniform(0, 20)
        while t < 1.5 * cv.size and placed < want:
            length = sample_length(rng, "vehicle", spec)
            placed += P.vehicle(cv, rng, centre + t * u + lane * n, length, heading, on="road")
            t += length + 1.5 + rng.exponential(2.0 * length)


def _parking_lot(cv: Canvas, rng: np.random.Generator, spec: SceneSpec, want: int) -> int:
    """Rows of stalls on concrete; vehicles park nose-in. Returns how many were placed."""
    s = cv.size
    length = rng.uniform(8, 12) * spec.object_scale
    pitch = max(3.0, 0.45 * length) + rng.uniform(1.5, 3.0)
    occupancy = rng.uniform(0.6, 0.95)
    stalls = int(np.ceil(want / occupancy)) + 1
    cols = int(max(2, min(stalls, int(0.85 * s / pitch))))
    rows = int(np.ceil(stalls / cols))
    row_h = length + 2
    block = 2 * row_h + length  # two rows back to back, then an aisle
    lot_w, lot_h = cols * pitch + 4, min((rows // 2) * block + (rows % 2) * row_h + 4, 0.9 * s)
    spot = _find_spot(cv, rng, lot_w, lot_h, on="dry")  # a lot may cover part of a road: the road ends there
    if spot is None:
        return 0
    x0, y0 = spot
    cv.road[int(y0):int(np.ceil(y0 + lot_h)), int(x0):int(np.ceil(x0 + lot_w))] = False
    cv.poly(rect(lot_w, lot_h) + (x0 + lot_w / 2, y0 + lot_h / 2), np.full(3, rng.uniform(118, 142)))
    placed = 0
    for r in range(rows):
        top = y0 + 2 + (r // 2) * block + (r % 2) * row_h
        if top + row_h > y0 + lot_h:
            break
        xs = x0 + 2 + pitch * np.arange(cols + 1)
        cv.lines([np.array([(x, top), (x, top + row_h)]) for x in xs], (200, 200, 195))
        for c in range(cols):
            if placed < want and rng.random() < occupancy:
                centre = (xs[c] + pitch / 2, top + row_h / 2)
                heading = np.pi / 2 if r % 2 == 0 else -np.pi / 2
                placed += P.vehicle(cv, rng, centre, length * rng.uniform(0.92, 1.08), heading)
    return placed


def _dense_fill(cv: Canvas, rng: np.random.Generator, spec: SceneSpec, layout: Layout) -> None:
    """Crowd the scene with small objects: big parking lots (or tank farms when vehicles are not a class)."""
    for _ in range(6):
        missing = spec.n_objects - len(cv.objects)
        if missing <= 0:
            return
        if "vehicle" in spec.classes:
            _parking_lot(cv, rng, spec, missing)
        elif "storagetank" in spec.classes:
            _tank_cluster(cv, rng, spec, missing)
        else:
            return


def _tank_cluster(cv: Canvas, rng: np.random.Generator, spec: SceneSpec, want: int) -> None:
    d = sample_length(rng, "storagetank", spec)
    gap = d * rng.uniform(1.15, 1.5)
    cols = int(max(1, min(want, rng.integers(1, 5))))
    rows = int(np.ceil(want / cols))
    spot = _find_spot(cv, rng, (cols + 1) * gap, (rows + 0.5) * gap)
    x0, y0 = (spot[0] + 0.3 * gap, spot[1] + 0.3 * gap) if spot is not None else tuple(rng.uniform(0, cv.size, 2))
    pad = np.array([(x0 - 0.3 * gap, y0 - 0.3 * gap), (x0 + cols * gap, y0 - 0.3 * gap),
                    (x0 + cols * gap, y0 + rows * gap), (x0 - 0.3 * gap, y0 + rows * gap)])
    if cv.fits(P.hbb(pad)):
        cv.poly(pad, np.full(3, rng.uniform(150, 175)))
    stagger = rng.random() < 0.5
    for i in range(want):
        r, c = divmod(i, cols)
        shift = gap / 2 if stagger and r % 2 else 0.0
        P.storagetank(cv, rng, (x0 + gap / 2 + c * gap + shift, y0 + gap / 2 + r * gap), d)


def _apron(cv: Canvas, rng: np.random.Generator, spec: SceneSpec, want: int) -> None:
    length = sample_length(rng, "airplane", spec)
    want = max(1, min(want, int((0.9 * cv.size - 4) // (1.15 * length))))
    w, h = want * 1.15 * length + 4, 1.3 * length
    spot = _find_spot(cv, rng, w, h)
    if spot is None:
        return
    x0, y0 = spot
    apron = np.array([(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)])
    cv.poly(apron, np.full(3, rng.uniform(150, 172)))
    same = rng.random() < 0.6
    heading = rng.uniform(0, 2 * np.pi)
    for i in range(want):
        centre = (x0 + 2 + (i + 0.5) * 1.15 * length, y0 + h / 2)
        P.airplane(cv, rng, centre, length * rng.uniform(0.9, 1.1), heading if same else rng.uniform(0, 2 * np.pi))


def _shore_ships(cv: Canvas, rng: np.random.Generator, spec: SceneSpec, shore: np.ndarray, want: int) -> None:
    s = cv.size
    for _ in range(want * 3):
        if want <= 0:
            return
        length = sample_length(rng, "ship", spec)
        x = int(rng.integers(2, s - 2))
        slope = (shore[min(x + 3, s - 1)] - shore[max(x - 3, 0)]) / 6.0
        along = float(np.arctan(slope)) + (np.pi if rng.random() < 0.5 else 0.0)
        near = 0.1 * length + 3  # keep the hull off the sand, at most halfway out to open water
        y = shore[x] - rng.uniform(near, max(near + 1.0, 0.5 * shore[x]))
        if rng.random() < 0.25:  # some ships at anchor, any heading
            along = rng.uniform(0, 2 * np.pi)
        want -= P.ship(cv, rng, (x, y), length, along + rng.normal(0, 0.08))


def _building(cv: Canvas, rng: np.random.Generator) -> None:
    """A roof (gable halves of two shades, or a flat roof) with a shadow; small sheds are near-vehicle decoys."""
    shed = rng.random() < 0.3
    length = rng.uniform(5, 9) if shed else rng.uniform(10, 42)
    width = length * rng.uniform(0.75, 1.0) if shed else length * rng.uniform(0.5, 1.0)
    centre, angle = rng.uniform(0, cv.size, 2), _angle(rng)
    roof = place(rect(length, width), centre, angle)
    if not cv.fits(P.hbb(roof)):
        return
    color = np.array((180, 170, 150)) if shed else ROOF_COLORS[rng.integers(len(ROOF_COLORS))]
    cv.shade(roof + 0.25 * width, 0.5)
    cv.poly(roof, color)
    if not shed and rng.random() < 0.7:
        cv.poly(place(rect(length, width / 2) + (0, width / 4), centre, angle), color * 0.8)  # the shaded roof half
    cv.claim(P.hbb(roof))


def _trees(cv: Canvas, rng: np.random.Generator) -> None:
    centre = rng.uniform(0, cv.size, 2)
    for _ in range(int(rng.integers(3, 12))):
        c = centre + rng.normal(0, 6, 2)
        r = rng.uniform(2, 5)
        box = P.hbb(np.array([c - r, c + r]))
        if cv.fits(box, on="land", margin=0):
            cv.disc(c + 0.5 * r, r, (25, 35, 22))
            cv.disc(c, r, (44, 82, 40) + rng.normal(0, 6, 3))


def _free_shadow(cv: Canvas, rng: np.random.Generator) -> None:
    centre = rng.uniform(0, cv.size, 2)
    blob = place(rect(rng.uniform(6, 25), rng.uniform(3, 12)), centre, rng.uniform(0, np.pi))
    if cv.fits(P.hbb(blob), on="any", margin=0):
        cv.shade(blob, rng.uniform(0.45, 0.7))

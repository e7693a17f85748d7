"""DOTA patch splitting: window layout, the 70% polygon rule, and a real split read back by the DOTA reader."""
from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import DOTA_SAMPLES, make_dota
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.data import ProblemReport, load_dataset
from runtime.data.dota_split import patch_starts, patch_windows, quad_in_window, split_dota
from runtime.errors import UserError


@st.composite
def image_patch_and_object(draw):
    patch = draw(st.integers(32, 1024))
    overlap = draw(st.integers(1, patch - 1))
    width, height = draw(st.integers(1, 4000)), draw(st.integers(1, 4000))
    # an object strictly smaller than the overlap, inside the image
    ow = draw(st.floats(0, min(overlap, width), exclude_max=True))
    oh = draw(st.floats(0, min(overlap, height), exclude_max=True))
    x = draw(st.floats(0, width - ow))
    y = draw(st.floats(0, height - oh))
    return width, height, patch, overlap, (x, y, x + ow, y + oh)


@settings(max_examples=300, deadline=None)
@given(image_patch_and_object())
def test_object_smaller_than_overlap_lies_whole_in_some_patch(case):
    width, height, patch, overlap, (x1, y1, x2, y2) = case
    # windows are the product of the per-axis starts, so check each axis, then the 2-D window that results
    xs = [x for x in patch_starts(width, patch, overlap) if x <= x1 and x2 <= min(x + patch, width)]
    ys = [y for y in patch_starts(height, patch, overlap) if y <= y1 and y2 <= min(y + patch, height)]
    assert xs and ys
    window = (xs[0], ys[0], min(xs[0] + patch, width), min(ys[0] + patch, height))
    poly = np.array([x1, y1, x2, y1, x2, y2, x1, y2], float)
    if x2 > x1 and y2 > y1:  # and the splitter itself finds the whole polygon (fraction 1) in that patch
        assert quad_in_window(poly, window)[1] == 1.0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6000), st.integers(16, 2048), st.data())
def test_windows_cover_the_image_and_stay_inside(length, patch, data):
    overlap = data.draw(st.integers(0, patch - 1))
    starts = patch_starts(length, patch, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(starts[-1] + patch, length) == length  # last window flush with the end
    assert all(s + min(patch, length) <= length for s in starts)
    assert all(b - a <= patch - overlap for a, b in zip(starts, starts[1:]))  # no gaps, overlap at least `overlap`


def test_devkit_offsets_and_window_order():
    assert patch_starts(2500, 1024, 200) == [0, 824, 1476]
    assert patch_starts(700, 1024, 200) == [0]
    assert patch_windows(1500, 700, 1024, 200) == [(0, 0, 1024, 700), (476, 0, 1500, 700)]
    assert patch_windows(100, 2000, 1024, 200) == [(0, 0, 100, 1024), (0, 824, 100, 1848), (0, 976, 100, 2000)]


def _objects(path):
    rows = [ln.split() for ln in path.read_text().splitlines()]
    return {r[8]: (np.array(r[:8], float).reshape(4, 2), r[9]) for r in rows}


def test_keep_rule_uses_polygon_area(tmp_path):
    # patch 64, overlap 16 on a 112 x 64 image: windows x in [0, 64] and [48, 112].
    # The trapezoid (x 40..72, 2 px tall on the left, 60 px on the right) has 75% of its *box* in window 0
    # but only 57% of its *area*: the polygon rule drops it there; 92% of it is in window 1, where it is kept.
    text = ("40 31 72 2 72 62 40 33 ship 0\n"
            "46 2 70 2 70 10 46 10 plane 1\n")  # a box 75% inside window 0, 92% inside window 1
    make_dota(tmp_path / "src", {"P9": text}, size=(112, 64))
    result = split_dota(tmp_path / "src", tmp_path / "dst", patch=64, overlap=16)
    assert result.patches == 2 and result.objects_in == 2 and result.objects_written == 3
    assert result.fragments_dropped == 1 and result.objects_in_no_patch == 0
    left = _objects(tmp_path / "dst" / "labelTxt" / "P9__64__0___0.txt")
    right = _objects(tmp_path / "dst" / "labelTxt" / "P9__64__48___0.txt")
    assert set(left) == {"plane"} and left["plane"][1] == "1"  # difficult flag kept
    np.testing.assert_allclose(left["plane"][0], [(46, 2), (64, 2), (64, 10), (46, 10)])  # clipped to the patch
    ship, _ = right["ship"]  # clipped at x = 48, then shifted by -48
    expected = {(0.0, 23.75), (24.0, 2.0), (24.0, 62.0), (0.0, 40.25)}
    assert {tuple(np.round(p, 2)) for p in ship} == expected
    np.testing.assert_allclose(right["plane"][0], [(0, 2), (22, 2), (22, 10), (0, 10)])
    # the devkit's alternative: write the small fragment with difficult flag 2 instead of dropping it
    split_dota(tmp_path / "src", tmp_path / "dst2", patch=64, overlap=16, below_thresh="difficult")
    left2 = _objects(tmp_path / "dst2" / "labelTxt" / "P9__64__0___0.txt")
    assert left2["ship"][1] == "2"
    assert load_dataset("dota", tmp_path / "dst2", "").records[0].difficult.sum() == 2  # flag 2 reads as difficult


@pytest.mark.skipif(not DOTA_SAMPLES.is_dir(), reason="DOTA samples not on this machine")
def test_split_real_samples_and_read_back(tmp_path):
    result = split_dota(DOTA_SAMPLES, tmp_path, patch=512, overlap=128)
    assert result.images == 2 and result.report.counts == {}
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert "P1888__512__0___0.png" in names and "P0706__512__599___670.png" in names  # flush with the far edge
    ds = load_dataset("dota", tmp_path, "", report=ProblemReport(strict=True))
    assert len(ds) == result.patches
    assert sum(len(r) for r in ds.records) == result.objects_written
    for rec in ds.records:
        assert rec.width <= 512 and rec.height <= 512
    # every P1888 vehicle (all far smaller than the 128 px overlap) appears whole in some patch
    p1888 = [r for r in ds.records if r.image_id.startswith("P1888")]
    assert sum(len(r) for r in p1888) >= 64


def test_split_bad_arguments(tmp_path):
    make_dota(tmp_path / "src", {"P1": "0 0 5 0 5 5 0 5 plane 0\n"})
    with pytest.raises(UserError, match="overlap"):
        split_dota(tmp_path / "src", tmp_path / "dst", patch=64, overlap=64)
    with pytest.raises(UserError, match="does not exist"):
        split_dota(tmp_path / "nope", tmp_path / "dst")

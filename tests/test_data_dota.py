"""DOTA labelTxt reading: the real samples, headers and CRLF, splits, class lists, bad lines."""
from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import DOTA_SAMPLES, make_dota

from runtime.data import DOTA_V1_5, ProblemReport, load_dataset
from runtime.errors import UserError

HEADER = "imagesource:GoogleEarth\ngsd:0.5\n"


def _counts(rec, classes):
    return {classes[i]: int(n) for i, n in enumerate(np.bincount(rec.labels, minlength=len(classes))) if n}


@pytest.mark.skipif(not DOTA_SAMPLES.is_dir(), reason="DOTA samples not on this machine")
def test_real_dota_samples_counts():
    report = ProblemReport(strict=True)  # the real files must load without a single problem
    ds = load_dataset("dota", DOTA_SAMPLES, "", report=report)
    by_id = {r.image_id: r for r in ds.records}
    p1888, p0706 = by_id["P1888"], by_id["P0706"]
    assert (p1888.width, p1888.height) == (712, 557)
    assert len(p1888) == 64 and _counts(p1888, ds.classes) == {"large-vehicle": 50, "small-vehicle": 14}
    assert len(p0706) == 536 and _counts(p0706, ds.classes) == {"ship": 531, "harbor": 5}
    assert int(p0706.difficult.sum()) == 6 and int(p1888.difficult.sum()) == 0
    # every box inside its image (one P0706 ship overshoots the border by a pixel and is clipped, not dropped)
    for rec in ds.records:
        assert (rec.boxes[:, 2] <= rec.width).all() and (rec.boxes[:, 3] <= rec.height).all()
        assert (rec.boxes[:, 2] > rec.boxes[:, 0]).all()
    assert report.notes["clipped-box"] == 1


def test_headers_crlf_and_polygon_to_box(tmp_path):
    text = HEADER + "10 10 30 12 28 30 8 28 plane 0\n40 40 60 40 60 50 40 50 ship 1\n50 5 70 5 70 15 50 15 helicopter\n"
    make_dota(tmp_path, {"P1": text}, crlf=True)
    assert b"\r\n" in (tmp_path / "labelTxt" / "P1.txt").read_bytes()
    ds = load_dataset("dota", tmp_path, "", strict=True)
    rec = ds.records[0]
    np.testing.assert_allclose(rec.boxes, [[8, 10, 30, 30], [40, 40, 60, 50], [50, 5, 70, 15]])
    assert [ds.classes[i] for i in rec.labels] == ["plane", "ship", "helicopter"]
    assert rec.difficult.tolist() == [False, True, False]  # 9 fields: difficult defaults to 0


def test_split_subdirectories_and_v15_classes(tmp_path):
    make_dota(tmp_path / "train", {"P1": "0 0 10 0 10 10 0 10 container-crane 0\n"})
    make_dota(tmp_path / "val", {"P2": "0 0 10 0 10 10 0 10 plane 0\n"})
    train = load_dataset("dota", tmp_path, "train", classes="dota1.5", strict=True)
    assert train.classes == DOTA_V1_5 and train.classes[train.records[0].labels[0]] == "container-crane"
    assert load_dataset(None, tmp_path, "val").records[0].image_id == "P2"  # format detected
    with pytest.raises(UserError, match="container-crane"):  # not a v1.0 class
        load_dataset("dota", tmp_path, "train", classes="dota1.0", strict=True)
    with pytest.raises(UserError, match="train, val"):
        load_dataset("dota", tmp_path, "test")


def test_malformed_lines_strict_and_lenient(tmp_path):
    text = HEADER + ("0 0 10 0 10 10 0 10 plane 0\n"
                     "1 2 3 plane\n"  # line 4: too few fields
                     "0 0 x 0 10 10 0 10 plane 0\n"  # line 5: not a number
                     "0 0 10 0 10 10 0 10 Plane 0\n")
    make_dota(tmp_path, {"P1": text})
    with pytest.raises(UserError) as err:
        load_dataset("dota", tmp_path, "", strict=True)
    assert "P1.txt:4" in str(err.value) and "malformed-annotation" in str(err.value)  # header lines count
    report = ProblemReport()
    ds = load_dataset("dota", tmp_path, "", report=report)
    assert len(ds.records[0]) == 2  # "Plane" matches case-insensitively
    assert report.counts == {"malformed-annotation": 2}
    assert any("P1.txt:5" in line for line in report.summary())


def test_unknown_class_degenerate_and_outside_boxes(tmp_path):
    text = ("0 0 10 0 10 10 0 10 spaceship 0\n"  # unknown class
            "5 5 5 5 5 5 5 5 plane 0\n"  # zero-size
            "200 200 210 200 210 210 200 210 plane 0\n"  # entirely outside the 100x80 image
            "90 70 110 70 110 90 90 90 plane 0\n"  # partly outside: clipped, kept
            "0 0 10 0 10 10 0 10 plane 0\n")
    make_dota(tmp_path, {"P1": text})
    report = ProblemReport()
    rec = load_dataset("dota", tmp_path, "", report=report).records[0]
    assert report.counts == {"unknown-class": 1, "degenerate-box": 1, "out-of-image-box": 1}
    np.testing.assert_allclose(rec.boxes, [[90, 70, 100, 80], [0, 0, 10, 10]])
    assert report.notes["clipped-box"] == 1


@pytest.mark.parametrize("line, kind", [
    ("0 0 10 0 10 10 0 10 spaceship 0", "unknown-class"),
    ("5 5 5 5 5 5 5 5 plane 0", "degenerate-box"),
    ("200 200 210 200 210 210 200 210 plane 0", "out-of-image-box"),
])
def test_bad_objects_stop_a_strict_load_with_file_and_line(tmp_path, line, kind):
    make_dota(tmp_path, {"P1": HEADER + line + "\n"})
    with pytest.raises(UserError, match=rf"P1\.txt:3: {kind}"):
        load_dataset("dota", tmp_path, "", strict=True)
    # lenient: the image stays (with no objects) and the problem is counted
    report = ProblemReport()
    assert len(load_dataset("dota", tmp_path, "", report=report).records[0]) == 0
    assert report.counts == {kind: 1}


def test_missing_and_corrupt_images(tmp_path):
    make_dota(tmp_path, {"P1": "0 0 10 0 10 10 0 10 plane 0\n", "P2": "0 0 10 0 10 10 0 10 plane 0\n",
                         "P3": "0 0 10 0 10 10 0 10 plane 0\n"})
    (tmp_path / "images" / "P2.png").unlink()
    (tmp_path / "images" / "P3.png").write_bytes(b"not a png at all")
    report = ProblemReport()
    ds = load_dataset("dota", tmp_path, "", report=report)
    assert [r.image_id for r in ds.records] == ["P1"]
    assert report.counts == {"missing-image": 1, "corrupt-image": 1}
    with pytest.raises(UserError, match="P2"):
        load_dataset("dota", tmp_path, "", strict=True)

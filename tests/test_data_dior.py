"""DIOR reading: layout variants, splits, class spellings, and every kind of bad input (strict vs lenient)."""
from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import make_dior, simple_dior, write_image

from runtime.data import DIOR_CLASSES, DataProblemWarning, ProblemReport, class_list, load_dataset
from runtime.data.dior import HBB_DIR
from runtime.errors import UserError


def test_dior_classes_real_spellings_and_resolver():
    assert len(DIOR_CLASSES) == 20
    assert {"Expressway-Service-area", "Expressway-toll-station", "golffield", "groundtrackfield"} <= set(DIOR_CLASSES)
    assert class_list("DIOR") == DIOR_CLASSES
    assert len(class_list("dota1.0")) == 15 and len(class_list("dota-v1.5")) == 16
    assert class_list("vehicle, ship") == ("vehicle", "ship")
    with pytest.raises(UserError, match="unknown class list"):
        class_list("imagenet")
    with pytest.raises(UserError, match="more than once"):
        class_list(["ship", "Ship"])


def test_reads_splits_boxes_and_case_insensitive_names(tmp_path):
    root = simple_dior(tmp_path / "DIOR")
    # lower-case spelling in the XML still maps to the real class name
    xml = root / HBB_DIR / "00002.xml"
    xml.write_text(xml.read_text().replace("Expressway-Service-area", "expressway-service-area"))
    trainval = load_dataset("dior", root, "trainval", strict=True)
    assert [r.image_id for r in trainval.records] == ["00001", "00002"]  # train + val
    rec = trainval.records[0]
    assert (rec.width, rec.height) == (64, 48) and rec.path.parent.name == "JPEGImages-trainval"
    np.testing.assert_allclose(rec.boxes, [[2, 3, 12, 9], [20, 10, 50, 40]])
    assert [DIOR_CLASSES[i] for i in rec.labels] == ["vehicle", "airplane"]
    assert DIOR_CLASSES[trainval.records[1].labels[0]] == "Expressway-Service-area"
    test = load_dataset("dior", root, "test", strict=True)
    assert test.records[0].path.parent.name == "JPEGImages-test"
    assert load_dataset(None, root).name.endswith("trainval")  # detected format, default split


def test_flat_annotations_folder(tmp_path):
    root = make_dior(tmp_path, {"7": [("ship", (1, 1, 9, 9))]}, {"train": ["7"]}, nested=False)
    ds = load_dataset("dior", root, "train", strict=True)
    assert DIOR_CLASSES[ds.records[0].labels[0]] == "ship"


def test_nonexistent_root_says_where_data_goes(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset("dior", tmp_path / "nope", "trainval")
    msg = str(err.value)
    assert "data/DIOR" in msg and "data/DOTA" in msg and "make demo" in msg and "runtime.data synth" in msg


def test_unknown_split_and_empty_split(tmp_path):
    root = simple_dior(tmp_path)
    with pytest.raises(UserError, match="test, train, trainval, val"):
        load_dataset("dior", root, "holdout")
    (root / "ImageSets" / "Main" / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="no usable images"):
        load_dataset("dior", root, "empty")


def test_split_whose_every_image_is_bad_is_an_error(tmp_path):
    root = simple_dior(tmp_path)
    (root / "JPEGImages-test" / "00003.jpg").unlink()
    with pytest.raises(UserError, match="all skipped — missing-image: 1"):
        load_dataset("dior", root, "test")


def _bad(root, kind):
    """Damage image 00001 of a simple DIOR set in the way named by `kind`."""
    xml = root / HBB_DIR / "00001.xml"
    jpg = root / "JPEGImages-trainval" / "00001.jpg"
    if kind == "missing-image":
        jpg.unlink()
    elif kind == "corrupt-image":
        jpg.write_bytes(b"\xff\xd8 truncated garbage")
    elif kind == "missing-annotation":
        xml.unlink()
    elif kind == "malformed-annotation":
        xml.write_text(xml.read_text().replace("</annotation>", ""))
    elif kind == "malformed-box":
        xml.write_text(xml.read_text().replace("<xmin>20</xmin>", "<xmin>twenty</xmin>"))
    elif kind == "unknown-class":
        xml.write_text(xml.read_text().replace("airplane", "zeppelin"))
    elif kind == "degenerate-box":
        xml.write_text(xml.read_text().replace("<xmax>50</xmax>", "<xmax>20</xmax>"))
    elif kind == "out-of-image-box":
        xml.write_text(xml.read_text().replace("<xmin>20</xmin>", "<xmin>70</xmin>").replace("<xmax>50</xmax>",
                                                                                               "<xmax>90</xmax>"))
    elif kind == "size-mismatch":
        write_image(jpg, 80, 48)


@pytest.mark.parametrize("kind, record_kept, objects_left", [
    ("missing-image", False, 0),
    ("corrupt-image", False, 0),
    ("missing-annotation", False, 0),
    ("malformed-annotation", False, 0),
    ("malformed-box", True, 1),
    ("unknown-class", True, 1),
    ("degenerate-box", True, 1),
    ("out-of-image-box", True, 1),
    ("size-mismatch", True, 2),
])
def test_bad_input_strict_stops_lenient_skips_and_counts(tmp_path, kind, record_kept, objects_left):
    root = simple_dior(tmp_path)
    _bad(root, kind)
    with pytest.raises(UserError) as err:
        load_dataset("dior", root, "trainval", strict=True)
    expected_kind = "malformed-annotation" if kind == "malformed-box" else kind
    assert expected_kind in str(err.value) and "00001" in str(err.value)
    if kind in ("malformed-annotation", "malformed-box", "unknown-class", "degenerate-box", "out-of-image-box"):
        assert "00001.xml:" in str(err.value)  # file and line
    report = ProblemReport()
    ds = load_dataset("dior", root, "trainval", report=report)
    assert report.counts == {expected_kind: 1}
    ids = [r.image_id for r in ds.records]
    assert ("00001" in ids) == record_kept and "00002" in ids
    if record_kept:
        assert len(ds.records[0]) == objects_left
    assert any(line.startswith(f"{expected_kind}: 1") for line in report.summary())


def test_lenient_load_without_report_warns(tmp_path):
    root = simple_dior(tmp_path)
    _bad(root, "unknown-class")
    with pytest.warns(DataProblemWarning, match="unknown-class: 1"):
        load_dataset("dior", root, "trainval")


def test_class_subset_makes_other_classes_unknown(tmp_path):
    root = simple_dior(tmp_path)
    report = ProblemReport()
    ds = load_dataset("dior", root, "trainval", classes=["vehicle", "airplane"], report=report)
    assert ds.classes == ("vehicle", "airplane")
    assert report.counts == {"unknown-class": 1}  # the Expressway-Service-area object
    assert ds.records[0].labels.tolist() == [0, 1]

"""COCO json: stable ids from to_coco_dict, write/read round trip, the DS2D2 reference layout, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from data_fixtures import simple_dior, write_image
from pycocotools.coco import COCO

from runtime.data import ProblemReport, load_dataset, to_coco_dict, write_coco
from runtime.errors import UserError
from runtime.records import DetectionSet, ImageRecord


def _dataset(tmp_path) -> DetectionSet:
    a = write_image(tmp_path / "imgs" / "a.jpg", 64, 48)
    b = write_image(tmp_path / "imgs" / "b.jpg", 32, 32)
    recs = [
        ImageRecord(a, 64, 48, np.array([[1, 2, 11, 22], [30.5, 4, 40, 9.25]], np.float32), np.array([1, 0]),
                    np.array([False, True])),
        ImageRecord(b, 32, 32),  # an image without objects must survive the round trip
    ]
    return DetectionSet("toy", ("vehicle", "ship"), recs)


def test_to_coco_dict_ids_are_stable(tmp_path):
    d = to_coco_dict(_dataset(tmp_path))
    assert [i["id"] for i in d["images"]] == [1, 2]
    assert d["categories"] == [{"id": 1, "name": "vehicle", "supercategory": "none"},
                               {"id": 2, "name": "ship", "supercategory": "none"}]
    a0, a1 = d["annotations"]
    assert a0 == {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 10.0, 20.0], "area": 200.0,
                  "iscrowd": 0}
    assert a1["category_id"] == 1 and a1["ignore"] == 1 and a1["difficult"] == 1
    assert a1["bbox"] == [30.5, 4.0, 9.5, 5.25] and a1["area"] == 9.5 * 5.25
    coco = COCO()  # pycocotools accepts it as ground truth
    coco.dataset = d
    coco.createIndex()
    assert len(coco.getAnnIds(imgIds=[1])) == 2


def test_write_read_round_trip(tmp_path):
    ds = _dataset(tmp_path)
    path = write_coco(ds, tmp_path / "out" / "toy.json")
    data = json.loads(path.read_text())
    assert data["images"][0]["file_name"].startswith("/")  # images outside the json dir: absolute names
    back = load_dataset("coco", path, strict=True)
    assert back.classes == ds.classes and len(back) == 2
    for r0, r1 in zip(ds.records, back.records):
        assert r1.path == r0.path and (r1.width, r1.height) == (r0.width, r0.height)
        np.testing.assert_allclose(r1.boxes, r0.boxes)
        assert r1.labels.tolist() == r0.labels.tolist() and r1.difficult.tolist() == r0.difficult.tolist()
    # relative names when the images lie under the json's folder
    rel = write_coco(ds, tmp_path / "rel.json")
    assert json.loads(rel.read_text())["images"][0]["file_name"] == "imgs/a.jpg"
    assert load_dataset("coco", rel).records[0].path.resolve() == ds.records[0].path.resolve()


def test_ds2d2_reference_layout_from_dior(tmp_path):
    dior = load_dataset("dior", simple_dior(tmp_path / "DIOR"), "trainval", strict=True)
    ref = tmp_path / "DIOR"  # reference layout: trainval.json next to JPEGImages-trainval/
    d = to_coco_dict(dior, image_root=ref / "JPEGImages-trainval")
    (ref / "trainval.json").write_text(json.dumps(d))
    assert d["images"][0]["file_name"] == "00001.jpg"
    back = load_dataset("coco", ref, "trainval", strict=True)
    assert back.classes == dior.classes and [r.path for r in back.records] == [r.path for r in dior.records]
    np.testing.assert_allclose(back.records[0].boxes, dior.records[0].boxes)


def test_bad_coco_input(tmp_path):
    ds = _dataset(tmp_path)
    path = write_coco(ds, tmp_path / "toy.json")
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 9, "image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5]})  # unknown category
    data["annotations"].append({"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5]})  # malformed bbox
    data["annotations"].append({"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 5]})  # degenerate
    data["annotations"].append({"id": 12, "image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5]})  # no such image
    data["images"].append({"id": 3, "file_name": "imgs/missing.jpg", "width": 8, "height": 8})
    path.write_text(json.dumps(data))
    report = ProblemReport()
    back = load_dataset("coco", path, report=report)
    assert len(back) == 2 and len(back.records[0]) == 2
    assert report.counts == {"unknown-class": 1, "malformed-annotation": 2, "degenerate-box": 1, "missing-image": 1}
    with pytest.raises(UserError, match=r"annotations\[2\]"):
        load_dataset("coco", path, strict=True)
    path.write_text("{not json")
    with pytest.raises(UserError, match="toy.json:1"):
        load_dataset("coco", path)

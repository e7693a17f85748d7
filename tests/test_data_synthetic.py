"""Synthetic DIOR-layout generator: loads through the DIOR reader, determinism, no rewrite, parameter checks."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from pydantic import ValidationError

from runtime.data import ProblemReport, load_dataset
from runtime.data.dior import HBB_DIR
from runtime.data.synthetic import SyntheticParams, generate, image_ids
from runtime.errors import UserError

SMALL = dict(image_size=128, num_train=5, num_val=2, num_test=3, objects_per_image=(3, 30), dense_objects=(100, 120),
             dense_scene_fraction=0.3)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generated_set_round_trips_through_the_dior_reader(tmp_path):
    params = SyntheticParams(**SMALL)
    result = generate(params, tmp_path / "syn")
    root = result.root
    assert result.written and result.images == {"train": 5, "val": 2, "test": 3}
    for folder in ("JPEGImages-trainval", "JPEGImages-test", HBB_DIR.as_posix(), "ImageSets/Main"):
        assert (root / folder).is_dir()
    report = ProblemReport(strict=True)  # the generator's own output must be spotless
    train = load_dataset("dior", root, "trainval", report=report)
    test = load_dataset("dior", root, "test", report=report)
    assert train.classes == params.classes  # taken from the manifest, not DIOR's 20
    assert len(train) == 7 and len(test) == 3 and report.notes == {}
    assert sum(len(r) for r in train.records + test.records) == result.objects
    per_class = np.bincount(np.concatenate([r.labels for r in train.records + test.records]), minlength=5)
    assert dict(zip(params.classes, per_class.tolist())) == result.per_class
    # the XML boxes are exactly the record boxes, in DIOR's VOC form
    rec = train.records[0]
    xml = ET.parse(root / HBB_DIR / f"{rec.image_id}.xml").getroot()
    assert xml.findtext("source/database") == "DIOR" and xml.findtext("size/width") == "128"
    boxes = [[float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] for o in xml.iter("object")]
    np.testing.assert_array_equal(rec.boxes, np.array(boxes, np.float32).reshape(-1, 4))


def test_scene_content_is_remote_sensing_like():
    params = SyntheticParams(seed=1, image_size=256, num_train=30, num_val=0, num_test=0, dense_scene_fraction=0.2)
    from runtime.data.synthetic import render_image

    sides, counts, classes = [], [], set()
    for i in range(30):
        img, objects = render_image(params, i)
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        counts.append(len(objects))
        for name, (x1, y1, x2, y2) in objects:
            assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256
            sides.append(max(x2 - x1, y2 - y1))
            classes.add(name)
    assert classes == set(params.classes)
    assert np.mean(np.array(sides) < 16) > 0.4  # many objects under 16 px
    assert max(counts) > 100  # some dense scenes
    assert img.std() > 10  # textured, not flat


def test_same_seed_is_byte_identical_and_rerun_writes_nothing(tmp_path):
    params = SyntheticParams(**SMALL)
    generate(params, tmp_path / "a")
    generate(params, tmp_path / "b")
    files_a = _files(tmp_path / "a")
    assert files_a == _files(tmp_path / "b")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    again = generate(SyntheticParams(**SMALL), tmp_path / "a")
    assert not again.written and again.objects == json.loads(files_a["manifest.json"])["counts"]["objects"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")} == mtimes
    other = generate(SyntheticParams(**{**SMALL, "seed": 1}), tmp_path / "c")
    assert _files(tmp_path / "c")["ImageSets/Main/train.txt"] == files_a["ImageSets/Main/train.txt"]
    assert _files(tmp_path / "c") != files_a and other.written


def test_manifest_records_seed_params_and_hashes(tmp_path):
    params = SyntheticParams(**SMALL, seed=7)
    generate(params, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["params"] == params.model_dump(mode="json")
    import hashlib

    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == digest


def test_other_params_into_existing_set_is_refused_unless_overwrite(tmp_path):
    generate(SyntheticParams(**SMALL), tmp_path / "s")
    with pytest.raises(UserError, match="differs in: num_test, seed"):
        generate(SyntheticParams(**{**SMALL, "seed": 3, "num_test": 1}), tmp_path / "s")
    res = generate(SyntheticParams(**{**SMALL, "num_test": 1}), tmp_path / "s", overwrite=True)
    assert res.written and res.images["test"] == 1
    assert len(list((tmp_path / "s" / "JPEGImages-test").iterdir())) == 1  # the old set is gone, not mixed in
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no synthetic manifest"):
        generate(SyntheticParams(**SMALL), tmp_path / "foreign", overwrite=True)


def test_missing_files_are_regenerated(tmp_path):
    generate(SyntheticParams(**SMALL), tmp_path)
    victim = next((tmp_path / "JPEGImages-test").iterdir())
    data = victim.read_bytes()
    victim.unlink()
    assert generate(SyntheticParams(**SMALL), tmp_path).written
    assert victim.read_bytes() == data


@pytest.mark.parametrize("extra", [
    dict(image_size=64, object_scale=3.0),
    dict(image_size=96, object_scale=0.5, dense_scene_fraction=1.0),
    dict(image_size=160, classes=["groundtrackfield", "baseballfield", "basketballcourt", "tenniscourt"]),
    dict(image_size=128, classes=["storagetank"], dense_scene_fraction=1.0, small_object_fraction=1.0),
])
def test_extreme_parameters_still_paint_valid_scenes(extra):
    from runtime.data.synthetic import render_image

    params = SyntheticParams(**{"num_train": 6, "num_val": 0, "num_test": 0, **extra})
    for i in range(6):
        img, objects = render_image(params, i)
        assert img.shape == (params.image_size, params.image_size, 3)
        for name, (x1, y1, x2, y2) in objects:
            assert name in params.classes and 0 <= x1 < x2 <= params.image_size and 0 <= y1 < y2 <= params.image_size


def test_params_validation():
    with pytest.raises(ValidationError, match="extra"):
        SyntheticParams(sede=1)
    with pytest.raises(ValidationError, match="unsupported classes"):
        SyntheticParams(classes=["vehicle", "dragon"])
    with pytest.raises(ValidationError, match="objects_per_image"):
        SyntheticParams(objects_per_image=(10, 2))
    assert SyntheticParams(classes=["Vehicle", "SHIP"]).classes == ("vehicle", "ship")
    ids = image_ids(SyntheticParams(num_train=2, num_val=1, num_test=1))
    assert ids == {"train": ["00001", "00002"], "val": ["00003"], "test": ["00004"]}

"""COCO metrics equal pycocotools' own COCOeval; VOC AP50 on hand-checked cases; the metrics CLI."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from runtime.errors import UserError
from runtime.metrics import ALL_POINT, VOC07, evaluate_coco, evaluate_detections, voc_ap50
from runtime.metrics.__main__ import main as metrics_main


def synthetic_gt_and_detections(seed: int, n_images: int = 40, n_classes: int = 4):
    """Random COCO GT (crowd and ignore/difficult objects, one class without GT) and noisy, partly wrong detections."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(n_classes + 1)]
    images, anns, dets = [], [], []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.integers(0, 12)):
            w, h = rng.uniform(4, 200, 2)
            x, y = rng.uniform(0, 400), rng.uniform(0, 300)
            cat = int(rng.integers(1, n_classes + 1))
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                   "area": w * h, "iscrowd": int(rng.random() < 0.05)}
            if rng.random() < 0.1:
                ann.update(ignore=1, difficult=1)
            anns.append(ann)
            for _ in range(rng.integers(0, 3)):  # noisy hits, sometimes with the wrong class
                noise = rng.normal(0, 0.15, 4) * [w, h, w / 2, h / 2]
                dets.append({"image_id": image_id,
                             "category_id": cat if rng.random() < 0.85 else int(rng.integers(1, n_classes + 2)),
                             "bbox": [float(v) for v in np.array([x, y, w, h]) + noise], "score": float(rng.random())})
        for _ in range(rng.integers(0, 4)):  # pure false positives
            dets.append({"image_id": image_id, "category_id": int(rng.integers(1, n_classes + 2)),
                         "bbox": [float(v) for v in rng.uniform(1, 300, 4)], "score": float(rng.random() * 0.6)})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def pycocotools_reference(gt: dict, dets: list) -> tuple[np.ndarray, np.ndarray]:
    """stats and precision straight from pycocotools' COCOeval (bbox, default parameters)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats, ev.eval["precision"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_metrics_equal_pycocotools(seed):
    gt, dets = synthetic_gt_and_detections(seed)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    ours = evaluate_coco(gt, dets)
    stats, precision = pycocotools_reference(gt, dets)
    names = ("AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l", "AR1", "AR10", "AR100", "AR_s", "AR_m", "AR_l")
    np.testing.assert_allclose([getattr(ours, n) for n in names], stats, rtol=0, atol=1e-9)
    for k, cat in enumerate(gt["categories"]):
        p50 = precision[0, :, k, 0, -1]
        expected = float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else None
        assert ours.per_class_AP50[cat["name"]] == pytest.approx(expected, abs=1e-9)
    assert ours.per_class_AP50["class4"] is None  # detections but no ground truth: undefined, as COCO says
    assert 0.05 < ours.AP50 < 0.95  # a meaningful test case, neither trivial nor hopeless
    assert gt == gt_before and dets == dets_before  # inputs untouched (pycocotools would add keys)


def test_coco_pycocotools_backend_agrees():
    gt, dets = synthetic_gt_and_detections(5)
    assert evaluate_coco(gt, dets, backend="pycocotools").AP == pytest.approx(evaluate_coco(gt, dets).AP, abs=1e-9)


def test_coco_perfect_and_empty_detections():
    gt, _ = synthetic_gt_and_detections(3)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    assert evaluate_coco(gt, perfect).AP == pytest.approx(1.0)
    empty = evaluate_coco(gt, [])
    assert empty.AP == 0.0 and empty.per_class_AP50["class0"] == 0.0


def test_coco_rejects_bad_detections():
    gt, dets = synthetic_gt_and_detections(0, n_images=3)
    with pytest.raises(UserError, match="category_id 99"):
        evaluate_coco(gt, [dict(dets[0], category_id=99)])
    with pytest.raises(UserError, match="image_id 1234"):
        evaluate_coco(gt, [dict(dets[0], image_id=1234)])
    with pytest.raises(UserError, match="bbox"):
        evaluate_coco(gt, [dict(dets[0], bbox=[1, 2, 3])])
    with pytest.raises(UserError, match="annotations"):
        evaluate_coco({"images": []}, [])


def _gt(boxes_by_image, difficult=()):
    """Tiny one-class COCO GT from {image_id: [xywh, ...]}; (image_id, index) pairs in ``difficult``."""
    anns = []
    for image_id, boxes in boxes_by_image.items():
        for i, box in enumerate(boxes):
            hard = (image_id, i) in difficult
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0, **({"ignore": 1, "difficult": 1} if hard else {})})
    images = [{"id": i, "width": 100, "height": 100} for i in boxes_by_image]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "ship"}, {"id": 2, "name": "car"}]}


def _det(image_id, box, score):
    return {"image_id": image_id, "category_id": 1, "bbox": box, "score": score}


def test_voc_ap_hand_computed():
    """2 GT; detections TP (0.9), FP (0.8), TP (0.7): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1."""
    gt = _gt({1: [[0, 0, 10, 10]], 2: [[50, 50, 20, 20]]})
    dets = [_det(1, [0, 0, 10, 10], 0.9), _det(1, [60, 60, 10, 10], 0.8), _det(2, [51, 50, 20, 20], 0.7)]
    all_point = voc_ap50(gt, dets, use_07_metric=False)
    # all-point: 0.5 * 1 + 0.5 * 2/3;  11-point: recall 0..0.5 -> 1 (6 points), 0.6..1 -> 2/3 (5 points)
    assert all_point.per_class_AP50["ship"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert all_point.metric == ALL_POINT and all_point.num_gt == {"ship": 2, "car": 0}
    voc07 = voc_ap50(gt, dets, use_07_metric=True)
    assert voc07.per_class_AP50["ship"] == pytest.approx((6 + 5 * 2 / 3) / 11) and voc07.metric == VOC07
    assert voc07.per_class_AP50["car"] is None and voc07.mAP == voc07.per_class_AP50["ship"]


def test_voc_difficult_and_duplicates():
    """A hit on a difficult box counts neither way; a second hit on a matched box is a false positive."""
    gt = _gt({1: [[0, 0, 10, 10], [40, 40, 10, 10]]}, difficult={(1, 1)})
    on_difficult = voc_ap50(gt, [_det(1, [0, 0, 10, 10], 0.9), _det(1, [40, 40, 10, 10], 0.95)])
    assert on_difficult.per_class_AP50["ship"] == pytest.approx(1.0) and on_difficult.num_difficult["ship"] == 1
    duplicate = voc_ap50(gt, [_det(1, [0, 0, 10, 10], 0.5), _det(1, [0, 0, 10, 10], 0.9)])
    assert duplicate.per_class_AP50["ship"] == pytest.approx(1.0)  # the TP comes first, the duplicate adds no recall
    low_first = voc_ap50(gt, [_det(1, [0, 0, 10, 4], 0.9), _det(1, [0, 0, 10, 10], 0.5)])  # IoU 0.4 miss, then hit
    assert low_first.per_class_AP50["ship"] == pytest.approx(0.5)


def test_evaluate_detections_returns_both():
    gt, dets = synthetic_gt_and_detections(4, n_images=10)
    result = evaluate_detections(gt, dets, use_07_metric=True)
    assert result.voc.metric == VOC07 and 0 < result.coco.AP50 < 1 and 0 < result.voc.mAP < 1
    assert set(result.as_dict()) == {"coco", "voc"}
    assert result.voc == voc_ap50(gt, dets, use_07_metric=True) and result.coco == evaluate_coco(gt, dets)
    # 'ignore' alone marks a difficult object for VOC, even though the COCO pass rewrites it (pycocotools does).
    only_ignore = copy.deepcopy(gt)
    for ann in only_ignore["annotations"]:
        ann.pop("difficult", None)
    assert evaluate_detections(only_ignore, dets, use_07_metric=True).voc == result.voc
    assert sum(result.voc.num_difficult.values()) > 0


@pytest.fixture()
def files(tmp_path):
    gt, dets = synthetic_gt_and_detections(6, n_images=8)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return tmp_path, gt, dets


def test_cli_json_matches_api(files, capsys):
    tmp_path, gt, dets = files
    assert metrics_main([str(tmp_path / "gt.json"), str(tmp_path / "dets.json"), "--json", "--voc07"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = evaluate_detections(gt, dets, use_07_metric=True).as_dict()
    assert out["coco"]["AP"] == pytest.approx(expected["coco"]["AP"], abs=1e-12)
    assert out["voc"]["metric"] == VOC07
    assert out["voc"]["per_class_AP50"] == pytest.approx(expected["voc"]["per_class_AP50"])


def test_cli_table(files, capsys):
    tmp_path, _, _ = files
    metrics_main([str(tmp_path / "gt.json"), str(tmp_path / "dets.json")])
    out = capsys.readouterr().out
    assert "class0" in out and ALL_POINT in out and "AP50" in out


@pytest.mark.parametrize("problem", ["missing", "malformed", "unknown-category"])
def test_cli_bad_input_one_line_exit_2(files, problem):
    tmp_path, _, dets = files
    det_path = tmp_path / "dets.json"
    if problem == "missing":
        det_path = tmp_path / "nothing.json"
    elif problem == "malformed":
        det_path.write_text('[{"image_id": 1,')
    else:
        det_path.write_text(json.dumps([dict(dets[0], category_id=42)]))
    proc = subprocess.run([sys.executable, "-m", "runtime.metrics", str(tmp_path / "gt.json"), str(det_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(det_path) in lines[0] and "Traceback" not in proc.stderr


def test_numpy_typed_detections_are_accepted():
    """Callers building results from arrays pass numpy scalars; they evaluate like plain numbers."""
    gt, dets = synthetic_gt_and_detections(7, n_images=6)
    as_numpy = [{"image_id": np.int64(d["image_id"]), "category_id": np.int64(d["category_id"]),
                 "bbox": np.asarray(d["bbox"], np.float32), "score": np.float32(d["score"])} for d in dets]
    assert evaluate_coco(gt, as_numpy).AP == pytest.approx(evaluate_coco(gt, dets).AP, abs=1e-6)

"""COCO box AP (AP, AP50, AP75, AP_s/m/l, AR) through faster-coco-eval, falling back to pycocotools.

Ground truth is a plain COCO dict (``images``, ``annotations``, ``categories``); detections are a COCO results list
(``image_id``, ``category_id``, ``bbox`` xywh, ``score``). Crowd / ignore semantics are exactly pycocotools':
``iscrowd: 1`` objects are ignored regions, and an ``ignore`` key *without* ``iscrowd`` has no effect (pycocotools
overwrites it with ``iscrowd``). The DIOR/VOC metric in :mod:`runtime.metrics.voc_ap` is the one that ignores
``difficult`` objects.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtime.errors import UserError

# Order of COCOeval.stats for boxes (pycocotools' summarize()).
_STAT_NAMES = ("AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l", "AR1", "AR10", "AR100", "AR_s", "AR_m", "AR_l")


@dataclass(frozen=True)
class CocoMetrics:
    """COCO summary numbers in [0, 1]; -1 where the range holds no ground truth (COCO's convention).

    ``per_class_AP`` / ``per_class_AP50`` map class name -> AP, ``None`` for a class without ground truth.
    """

    AP: float
    AP50: float
    AP75: float
    AP_s: float
    AP_m: float
    AP_l: float
    AR1: float
    AR10: float
    AR100: float
    AR_s: float
    AR_m: float
    AR_l: float
    per_class_AP: dict[str, float | None] = field(default_factory=dict)
    per_class_AP50: dict[str, float | None] = field(default_factory=dict)
    backend: str = "faster-coco-eval"

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def _fail(what: str, where: str, fix: str = "fix the file or regenerate it") -> UserError:
    return UserError(what, where, fix)


def check_coco_gt(gt: Any, where: str = "ground truth") -> dict[str, Any]:
    """Validate a COCO ground-truth dict; return a copy (new dicts, shared values) with pycocotools' keys filled in.

    Missing ``area`` becomes w*h and missing ``iscrowd`` 0 (pycocotools would crash on them); nothing else changes.
    """
    if not isinstance(gt, Mapping):
        raise _fail("ground truth is not a COCO dict (expected keys images, annotations, categories)", where)
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise _fail(f"ground truth has no '{key}' list", where)
    # Copy one level deep: the evaluators add keys to the annotation dicts, never change nested values.
    gt = {**gt, **{key: [dict(x) if isinstance(x, Mapping) else x for x in gt[key]]
                   for key in ("images", "annotations", "categories")}}
    for key in ("images", "categories"):
        for i, item in enumerate(gt[key]):
            if not isinstance(item, dict) or not isinstance(item.get("id"), (int, str)):
                raise _fail("entry has no integer (or string) 'id'", f"{where}: {key}[{i}]")
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    if len(cat_ids) != len(gt["categories"]) or len(image_ids) != len(gt["images"]):
        raise _fail("duplicate image or category ids", where)
    for cat in gt["categories"]:
        cat.setdefault("name", str(cat["id"]))
    used_ids = [a["id"] for a in gt["annotations"] if isinstance(a, dict) and isinstance(a.get("id"), int)]
    next_id = max(used_ids, default=0) + 1
    for i, ann in enumerate(gt["annotations"]):
        here = f"{where}: annotations[{i}]"
        if not isinstance(ann, dict) or not _is_xywh(ann.get("bbox")):
            raise _fail("annotation has no 'bbox' [x, y, w, h] of 4 finite numbers", here)
        if not _known(ann.get("image_id"), image_ids):
            raise _fail(f"annotation refers to image_id {ann.get('image_id')!r} not in 'images'", here)
        if not _known(ann.get("category_id"), cat_ids):
            raise _fail(f"annotation refers to category_id {ann.get('category_id')!r} not in 'categories'", here)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1
    return gt


def check_detections(detections: Any, gt: Mapping[str, Any], where: str = "detections") -> list[dict[str, Any]]:
    """Validate a COCO results list against the ground truth and return a copy.

    Every entry needs image_id and category_id known to ``gt``, a 4-number xywh ``bbox`` and a finite ``score``.
    """
    if not isinstance(detections, Sequence) or isinstance(detections, (str, bytes)):
        raise _fail("detections are not a COCO results list (a JSON array of objects)", where)
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    out = []
    for i, det in enumerate(detections):
        here = f"{where}[{i}]"
        if not isinstance(det, Mapping):
            raise _fail("detection is not an object", here)
        if not _known(det.get("image_id"), image_ids):
            raise _fail(f"image_id {det.get('image_id')!r} is not in the ground truth's images", here,
                        "evaluate detections against the ground truth they were made for")
        if not _known(det.get("category_id"), cat_ids):
            raise _fail(f"category_id {det.get('category_id')!r} is not in the ground truth's categories "
                        f"{sorted(cat_ids, key=str)}", here,
                        "category ids must be the ground truth's (label + 1 for ours)")
        if not _is_xywh(det.get("bbox")):
            raise _fail("'bbox' must be [x, y, w, h] of 4 finite numbers", here)
        score = det.get("score")
        if not _is_number(score):
            raise _fail(f"'score' must be a finite number, got {score!r}", here)
        # Plain Python types: callers may hand numpy scalars, the C++ evaluator wants ints and floats.
        out.append({"image_id": _plain_id(det["image_id"]), "category_id": _plain_id(det["category_id"]),
                    "bbox": [float(v) for v in det["bbox"]], "score": float(score)})
    return out


def _plain_id(value: Any) -> int | str:
    return value if isinstance(value, str) else int(value)


def _known(value: Any, ids: set[Any]) -> bool:
    return isinstance(value, (numbers.Integral, str)) and not isinstance(value, bool) and value in ids


def _is_number(v: Any) -> bool:
    # type() fast path first: the ABC check is slow over millions of coordinates.
    return (type(v) in (float, int) or (isinstance(v, numbers.Real) and not isinstance(v, bool))) and math.isfinite(v)


def _is_xywh(bbox: Any) -> bool:
    return isinstance(bbox, (list, tuple, np.ndarray)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)


def _backend(prefer: str) -> tuple[str, Any, Any]:
    """(name, COCO class, COCOeval class) of the first importable backend, in preference order."""
    order = ["faster-coco-eval", "pycocotools"]
    if prefer not in order:
        raise UserError(f"unknown COCO backend {prefer!r}", fix=f"use one of {order}")
    order.sort(key=lambda name: name != prefer)
    for name in order:
        try:
            if name == "faster-coco-eval":
                from faster_coco_eval import COCO, COCOeval_faster
                return name, COCO, COCOeval_faster
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
            return name, COCO, COCOeval
        except ImportError:
            continue
    raise UserError("neither faster-coco-eval nor pycocotools is installed", fix="pip install faster-coco-eval")


def evaluate_coco(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
                  backend: str = "faster-coco-eval") -> CocoMetrics:
    """COCO bbox evaluation of ``detections`` (COCO results list) against the COCO dict ``gt``.

    Numbers equal pycocotools' COCOeval (bbox, default params) on the same inputs; neither input is modified.
    """
    gt = check_coco_gt(gt)
    return coco_metrics_checked(gt, check_detections(detections, gt), backend)


def coco_metrics_checked(gt: dict[str, Any], dets: list[dict[str, Any]],
                         backend: str = "faster-coco-eval") -> CocoMetrics:
    """evaluate_coco on the outputs of check_coco_gt / check_detections; the evaluator adds keys to their dicts."""
    name, coco_cls, eval_cls = _backend(backend)
    # Both libraries print progress; keep library output off the user's terminal.
    with contextlib.redirect_stdout(io.StringIO()):
        if name == "faster-coco-eval":
            coco_gt = coco_cls(gt, print_function=lambda *a, **k: None)
        else:
            coco_gt = coco_cls()
            coco_gt.dataset = gt
            coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_cls, gt)
        kwargs = {"print_function": lambda *a, **k: None} if name == "faster-coco-eval" else {}
        ev = eval_cls(coco_gt, coco_dt, "bbox", **kwargs)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in np.asarray(ev.stats)[: len(_STAT_NAMES)]]
    precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
    names = {c["id"]: str(c["name"]) for c in gt["categories"]}
    cat_ids = list(ev.params.catIds)
    per_ap, per_ap50 = {}, {}
    for k, cat_id in enumerate(cat_ids):
        all_area = precision[:, :, k, 0, -1]  # area 'all', maxDets 100, like summarize()
        per_ap[names[cat_id]] = _mean_valid(all_area)
        per_ap50[names[cat_id]] = _mean_valid(all_area[0])  # iouThrs[0] == 0.5
    return CocoMetrics(**dict(zip(_STAT_NAMES, stats)), per_class_AP=per_ap, per_class_AP50=per_ap50, backend=name)


def _mean_valid(values: np.ndarray) -> float | None:
    """Mean of entries > -1 the way pycocotools summarize() does; None when there are none (no ground truth)."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else None


def _empty_results(coco_cls: Any, gt: dict[str, Any]) -> Any:
    """A results COCO object with no detections (pycocotools' loadRes refuses an empty list)."""
    res = coco_cls()
    res.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]), "annotations": []}
    res.createIndex()
    return res

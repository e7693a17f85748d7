"""DIOR / PASCAL-VOC style per-class AP at IoU 0.5 (VOC07 11-point or all-point area), difficult objects ignored.

Matching follows the VOC devkit as mmdetection's ``eval_map`` runs it: detections of a class are taken in descending
score order; each one is matched to the ground-truth box of that class in its image with the highest IoU; IoU >= 0.5
with an unmatched box is a true positive, with an already matched box a false positive, and a match on a *difficult*
box (``difficult``, ``ignore`` or ``iscrowd`` set) counts neither way. IoU uses continuous coordinates (no +1).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtime.metrics.coco_eval import check_coco_gt, check_detections
from runtime.nms import box_iou

VOC07 = "VOC07 11-point"
ALL_POINT = "all-point area"


@dataclass(frozen=True)
class VocMetrics:
    """Per-class AP50 (None for a class without non-difficult ground truth) and their mean over classes that have it."""

    mAP: float | None
    per_class_AP50: dict[str, float | None]
    num_gt: dict[str, int]  # non-difficult ground-truth objects per class
    metric: str  # VOC07 or ALL_POINT: which AP definition produced the numbers
    iou_thr: float = 0.5
    num_difficult: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from a recall/precision curve (detections in score order): VOC07 11-point or all-point area."""
    if use_07_metric:
        # Mean of the best precision reached at recall >= t for t = 0, 0.1, ..., 1.
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0.0, 1.0, 11)]))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope (monotonically decreasing)
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _xyxy(bboxes: list[list[float]]) -> np.ndarray:
    arr = np.asarray(bboxes, np.float64).reshape(-1, 4)
    return np.concatenate([arr[:, :2], arr[:, :2] + arr[:, 2:]], axis=1)


def _class_tp_fp(det_img: np.ndarray, det_boxes: np.ndarray, gts: dict[int, tuple[np.ndarray, np.ndarray]],
                 iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """TP / FP flags of one class's detections (already in descending score order); ignored ones are both 0."""
    tp = np.zeros(len(det_img), bool)
    fp = np.zeros(len(det_img), bool)
    # Matching is independent per image; a stable sort by image keeps the score order inside each image.
    by_image = np.argsort(det_img, kind="stable")
    splits = np.nonzero(np.diff(det_img[by_image]))[0] + 1
    for idx in np.split(by_image, splits):
        if idx.size == 0:
            continue
        gt_boxes, gt_difficult = gts.get(int(det_img[idx[0]]), (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(gt_boxes) == 0:
            fp[idx] = True
            continue
        ious = box_iou(det_boxes[idx], gt_boxes)
        best = ious.argmax(axis=1)
        best_iou = ious[np.arange(len(idx)), best]
        covered = np.zeros(len(gt_boxes), bool)
        for d, g, iou in zip(idx, best, best_iou):  # greedy in score order: inherently sequential
            if iou < iou_thr:
                fp[d] = True
            elif gt_difficult[g]:
                continue
            elif covered[g]:
                fp[d] = True
            else:
                covered[g] = tp[d] = True
    return tp, fp


def voc_ap50(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], use_07_metric: bool = False,
             iou_thr: float = 0.5) -> VocMetrics:
    """Per-class VOC/DIOR AP50 of COCO-results ``detections`` against the COCO dict ``gt`` (difficult ignored)."""
    gt = check_coco_gt(gt)
    return voc_metrics_checked(gt, check_detections(detections, gt), use_07_metric, iou_thr)


def voc_metrics_checked(gt: dict[str, Any], dets: list[dict[str, Any]], use_07_metric: bool = False,
                        iou_thr: float = 0.5) -> VocMetrics:
    """voc_ap50 on the outputs of check_coco_gt / check_detections (read only)."""
    names = {c["id"]: str(c["name"]) for c in gt["categories"]}
    per_class: dict[str, float | None] = {}
    num_gt: dict[str, int] = {}
    num_difficult: dict[str, int] = {}
    image_index = {img["id"]: i for i, img in enumerate(gt["images"])}  # ids may be ints or strings
    anns_by_cat: dict[int, list[dict[str, Any]]] = {c: [] for c in names}
    dets_by_cat: dict[int, list[dict[str, Any]]] = {c: [] for c in names}
    for a in gt["annotations"]:
        anns_by_cat[a["category_id"]].append(a)
    for d in dets:
        dets_by_cat[d["category_id"]].append(d)
    for cat_id in names:  # in the ground truth's category order
        anns = anns_by_cat[cat_id]
        difficult = np.array([bool(a.get("difficult") or a.get("ignore") or a.get("iscrowd")) for a in anns], bool)
        boxes = _xyxy([a["bbox"] for a in anns])
        ann_img = np.array([image_index[a["image_id"]] for a in anns], np.int64)
        by_image = np.argsort(ann_img, kind="stable")
        images, starts = np.unique(ann_img[by_image], return_index=True)
        gts = {int(i): (boxes[idx], difficult[idx]) for i, idx in zip(images, np.split(by_image, starts[1:]))}
        name = names[cat_id]
        num_gt[name] = int((~difficult).sum())
        num_difficult[name] = int(difficult.sum())
        cls_dets = dets_by_cat[cat_id]
        if num_gt[name] == 0:
            per_class[name] = None  # AP undefined without positives; left out of the mean like mmdet / VOC
            continue
        scores = np.array([d["score"] for d in cls_dets], np.float64)
        order = np.argsort(-scores, kind="stable")
        det_img = np.array([image_index[cls_dets[i]["image_id"]] for i in order], np.int64)
        det_boxes = _xyxy([cls_dets[i]["bbox"] for i in order])
        tp, fp = _class_tp_fp(det_img, det_boxes, gts, iou_thr)
        counted = tp | fp
        tp_cum = np.cumsum(tp[counted])
        fp_cum = np.cumsum(fp[counted])
        recall = tp_cum / num_gt[name]
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        per_class[name] = average_precision(recall, precision, use_07_metric)
    valid = [ap for ap in per_class.values() if ap is not None]
    return VocMetrics(mAP=float(np.mean(valid)) if valid else None, per_class_AP50=per_class, num_gt=num_gt,
                      metric=VOC07 if use_07_metric else ALL_POINT, iou_thr=iou_thr, num_difficult=num_difficult)

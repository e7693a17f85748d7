"""Detection metrics: COCO AP through faster-coco-eval / pycocotools and DIOR/VOC per-class AP50.

Inputs are plain COCO dicts (ground truth) and COCO results lists (detections), so the numbers can be checked from
files with ``python -m runtime.metrics GT.json DETECTIONS.json``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.metrics.coco_eval import (CocoMetrics, check_coco_gt, check_detections, coco_metrics_checked,
                                      evaluate_coco)
from runtime.metrics.voc_ap import ALL_POINT, VOC07, VocMetrics, average_precision, voc_ap50, voc_metrics_checked


@dataclass(frozen=True)
class EvalResult:
    """COCO metrics and DIOR/VOC per-class AP50 of one set of detections."""

    coco: CocoMetrics
    voc: VocMetrics

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with keys ``coco`` and ``voc``."""
        return {"coco": self.coco.as_dict(), "voc": self.voc.as_dict()}


def evaluate_detections(dataset_coco_dict: Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
                        use_07_metric: bool = False) -> EvalResult:
    """COCO metrics and VOC-style AP50 (11-point if ``use_07_metric`` else all-point) of COCO-results detections."""
    gt = check_coco_gt(dataset_coco_dict)
    dets = check_detections(detections, gt)
    # VOC first: it only reads, while the COCO evaluator rewrites 'ignore' in the annotation dicts (as pycocotools).
    voc = voc_metrics_checked(gt, dets, use_07_metric=use_07_metric)
    return EvalResult(coco=coco_metrics_checked(gt, dets), voc=voc)


__all__ = ["ALL_POINT", "VOC07", "CocoMetrics", "EvalResult", "VocMetrics", "average_precision", "check_coco_gt",
           "check_detections", "evaluate_coco", "evaluate_detections", "voc_ap50"]

"""What host post-processing costs per image, side by side: the runtime's RetinaNet post-processing (one-pass
threshold and top-k, NMS by runtime.nms's default kernel), torchvision's postprocess_detections on the same outputs
(torch CPU), the numpy reference of EfficientNMS_TRT, and reading an in-graph NMS's padded outputs.

    python -m benchmarks.postprocess_cost [--iters 50] [--warmup 5] [--json PATH]

Head outputs are generated the way a trained RetinaNet fires: a background of low logits, and around each object
a cluster of anchors (IoU > 0.3 with it) with high logits for its class and small box deltas, so thresholding,
the per-level top-k and NMS all have realistic work. Two settings: the demo size (256 px, 5 classes, 30 objects)
and DIOR's (800 px, 20 classes, 100 objects). Every figure is the median of ``--iters`` (>= 20) calls after
``--warmup`` untimed ones, on one CPU thread of this machine.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.timing import measure
from runtime.anchors import AnchorSpec, generate_anchors
from runtime.atomic import write_json_atomic
from runtime.cli import add_debug_flag, run_cli
from runtime.efficient_nms import PLUGIN_OUTPUTS, efficient_nms
from runtime.errors import UserError
from runtime.nms import box_iou, default_kernel
from runtime.postprocess import (PaddedDetectionsPostprocess, PostprocessSpec, RetinaNetPostprocess,
                                 efficient_nms_attributes)

SETTINGS = (("demo", 256, 5, 30), ("dior", 800, 20, 100))


def head_outputs(size: int, classes: int, objects: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(cls_logits (A, C), bbox_regression (A, 4), candidates above 0.05) shaped like a trained head's output."""
    rng = np.random.default_rng(seed)
    anchors, _ = generate_anchors(AnchorSpec(), (size, size))
    logits = rng.normal(-6.0, 1.0, (len(anchors), classes)).astype(np.float32)
    xy = rng.uniform(0, size * 0.9, (objects, 2))
    wh = rng.uniform(size / 40, size / 6, (objects, 2))
    gt = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    labels = rng.integers(0, classes, objects)
    iou = box_iou(anchors, gt)
    for j in range(objects):
        hot = np.flatnonzero(iou[:, j] > 0.3)
        logits[hot, labels[j]] = rng.normal(0.5, 1.5, hot.size) + 3 * iou[hot, j]
    deltas = rng.normal(0, 0.2, (len(anchors), 4)).astype(np.float32)
    return logits, deltas, int((logits > np.log(0.05 / 0.95)).sum())


def run(size: int, classes: int, objects: int, iters: int, warmup: int) -> dict[str, Any]:
    """Median per-image times of each post-processing on one generated image."""
    import torch
    import torchvision
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.set_num_threads(1)
    spec = PostprocessSpec(kind="retinanet", num_classes=classes, anchors=AnchorSpec())
    logits, deltas, candidates = head_outputs(size, classes, objects)
    anchors, per_level = generate_anchors(spec.anchors, (size, size))
    ours = RetinaNetPostprocess(spec)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    model = RetinaNet(backbone, num_classes=classes, min_size=size, max_size=size, score_thresh=0.05,
                      nms_thresh=0.5, detections_per_img=100, topk_candidates=1000).eval()
    head = {"cls_logits": list(torch.from_numpy(logits[None]).split(list(per_level), dim=1)),
            "bbox_regression": list(torch.from_numpy(deltas[None]).split(list(per_level), dim=1))}
    anchor_list = [list(torch.from_numpy(anchors.copy()).split(list(per_level)))]

    def torchvision_post() -> Any:
        with torch.no_grad():
            return model.postprocess_detections(head, anchor_list, [(size, size)])

    boxes = torch.from_numpy(anchors.copy())
    decoded = model.box_coder.decode_single(torch.from_numpy(deltas), boxes)
    decoded = torchvision.ops.clip_boxes_to_image(decoded, (size, size)).numpy()[None]
    attrs = efficient_nms_attributes(spec)
    padded_outputs = efficient_nms(decoded, logits[None], attrs)
    padded = PaddedDetectionsPostprocess(spec.model_copy(update={"kind": "padded"}))
    found = ours(logits, deltas, (size, size))
    reference = torchvision_post()[0]
    agree = len(found) == len(reference["scores"]) and np.allclose(found.boxes, reference["boxes"].numpy(), atol=1e-3)
    timings = {
        f"runtime ({default_kernel()} NMS)": measure(lambda: ours(logits, deltas, (size, size)), iters, warmup),
        "torchvision postprocess_detections (torch CPU, 1 thread)": measure(torchvision_post, iters, warmup),
        "EfficientNMS_TRT numpy reference (plugin inputs)": measure(
            lambda: efficient_nms(decoded, logits[None], attrs), iters, warmup),
        "padded outputs of in-graph NMS (read only)": measure(
            lambda: padded.from_outputs(padded_outputs, (size, size)), iters, warmup),
    }
    return {"size": size, "classes": classes, "objects": objects, "anchors": int(len(anchors)),
            "scores": int(logits.size), "candidates_above_0.05": candidates, "detections": len(found),
            "equal_to_torchvision": bool(agree),
            "timings": {name: t.as_dict() for name, t in timings.items()}}


def print_table(result: dict[str, Any], console: Console) -> None:
    """One table: median ms per image for every setting."""
    m = result["machine"]
    table = Table(title=f"host post-processing per image (median of {result['iters']} after {result['warmup']} "
                        f"warm-up calls, 1 thread, {m.get('cpu_model', '?')}), {result['date']}")
    table.add_column("post-processing")
    for s in result["settings"]:
        table.add_column(f"{s['name']}: {s['size']} px, {s['classes']} cl, {s['candidates_above_0.05']} cand.",
                         justify="right")
    for name in result["settings"][0]["timings"]:
        table.add_row(name, *(f"{s['timings'][name]['median_ms']:.2f} ms" for s in result["settings"]))
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.postprocess_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=50, help="timed calls per measurement (>= 20, default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--json", type=Path, default=Path("reports/postprocess_cost.json"))
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.iters < 20 or args.warmup < 1:
        raise UserError("micro-timings take the median of >= 20 calls after >= 1 warm-up", "--iters / --warmup")
    from runtime.machine import machine_facts

    settings = [{"name": name, **run(size, classes, objects, args.iters, args.warmup)}
                for name, size, classes, objects in SETTINGS]
    result = {"benchmark": "postprocess_cost", "iters": args.iters, "warmup": args.warmup, "threads": 1,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_facts(),
              "settings": settings}
    print_table(result, Console())
    write_json_atomic(args.json, result)
    Console(stderr=True).print(f"wrote {args.json}", markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    run_cli(main)

"""`--latency-only`: time a pipeline's real architectures without trained weights.

Randomly initialised teacher and student (the pipeline's exact ModelSpecs, no ImageNet download) are saved as
ordinary model checkpoints and go through the real deploy chain (deploy.build: export, fidelity check, INT8
calibration, bundle). Calibration uses the pipeline's own training images when they exist (a synthetic dataset is
generated first); when they do not (DIOR / DOTA are not shipped), a synthetic set at the pipeline's input size stands
in, and the report says so. Latency does not depend on the weights; accuracy of such rows is meaningless and is not
reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.checkpoint import model_payload, save_checkpoint
from distill.models.build import build_detector, count_parameters, gflops
from runtime.config import Pipeline
from runtime.data.classes import class_list

SEED = 0
# Untrained deep nets (R101 with identity frozen BN) carry large, unnormalised activations, so float32 summation order
# alone moves ONNX Runtime's logits ~1e-3 away from PyTorch's. The export check still runs, with this looser bound.
FIDELITY_OVERRIDES = ["deploy.fidelity_atol=0.01"]
FIDELITY_NOTE = ("The PyTorch-vs-ONNX Runtime export check of untrained networks used atol 0.01 instead of the "
                 "configured bound: their unnormalised activations make float32 summation-order differences larger.")


@dataclass
class Calibration:
    """How latency-only bundles are calibrated: extra --set overrides for deploy.build and a note for the report."""

    overrides: list[str] = field(default_factory=list)
    note: str = ""


def random_checkpoint(pipe: Pipeline, role: str, path: Path, method: str | None = None) -> tuple[Path, int, float]:
    """Write (once) a model.pt of `role` with seeded random weights; returns (path, parameters, GFLOPs)."""
    spec = (pipe.teacher if role == "teacher" else pipe.student).model_copy(update={"pretrained_backbone": False})
    classes = list(class_list(pipe.dataset.classes))
    torch.manual_seed(SEED)  # same bytes every time, so deploy.build reuses the bundle on the next run
    model = build_detector(spec, len(classes), pipe.input_size, score_thresh=pipe.test.score_thresh,
                           nms_thresh=pipe.test.nms_iou, detections_per_img=pipe.test.max_detections,
                           topk_candidates=pipe.test.topk_candidates).eval()
    if not path.is_file():
        meta = {"role": role, "method": method if role == "student" else None,
                "model_spec": spec.model_dump(mode="json"), "num_classes": len(classes), "classes": classes,
                "input_size": pipe.input_size, "config": pipe.as_dict(), "config_hash": "untrained"}
        save_checkpoint(path, model_payload(meta, model, {}, finished=False, untrained=True))
    return path, count_parameters(model), gflops(model, pipe.input_size)


def calibration_for(pipe: Pipeline, data_dir: Path, images: int) -> Calibration:
    """Use the pipeline's training images when present (generating a synthetic set); else a synthetic stand-in."""
    # MinMax: ONNX Runtime's calibrators hold every activation of every calibration image in memory (gigabytes per
    # image for R101 at 800 px); the calibration method sets scales only, never the INT8 graph that is timed.
    common = [f"calibration.images={images}", "calibration.method=minmax"]
    if pipe.dataset.synthetic is not None or pipe.dataset_root.exists():
        return Calibration(common, f"INT8 calibrated (MinMax) on {images} images of the pipeline's own training "
                                   f"split ({pipe.dataset_root}).")
    from runtime.data.painters import SUPPORTED_CLASSES
    from runtime.data.synthetic import DEFAULT_CLASSES, SyntheticParams, generate

    # Paint the pipeline's own classes where the generator knows them (DIOR's do), so the loader skips nothing.
    known = {c.lower() for c in SUPPORTED_CLASSES}
    classes = tuple(c for c in class_list(pipe.dataset.classes) if c.lower() in known) or DEFAULT_CLASSES
    params = SyntheticParams(seed=SEED, image_size=pipe.input_size, num_train=images, num_val=0, num_test=2,
                             classes=classes)
    generate(params, data_dir)
    overrides = common + [f"dataset.root={data_dir.resolve()}", "dataset.synthetic=null", "dataset.format=dior",
                          "dataset.train_split=train", "dataset.test_split=test", "dataset.val_split=null",
                          "calibration.split=train", "deploy.eval_images=2"]
    note = (f"The pipeline's dataset is not on this machine ({pipe.dataset_root} is missing): INT8 was calibrated "
            f"(MinMax) on {images} synthetic images generated at the pipeline's input size ({pipe.input_size} px, "
            f"runtime.data.synthetic, in {data_dir}). Calibration ranges do not change the INT8 graph that is timed, "
            "but such an INT8 model must not be used for accuracy.")
    return Calibration(overrides, note)

"""`--latency-only`: time a pipeline's real architectures without trained weights.

Randomly initialised teacher and student (the pipeline's exact ModelSpecs, no ImageNet download) are saved as
ordinary model checkpoints and go through the real deploy chain (deploy.build: export, fidelity check, INT8
calibration, bundle). Calibration uses the pipeline's own training images when they exist (a synthetic dataset is
generated first); when they do not (DIOR / DOTA are not shipped), a synthetic set at the pipeline's input size stands
in, and the report says so. Latency does not depend on the weights; accuracy of such rows is meaningless and is not
reported.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.checkpoint import load_checkpoint, model_payload, save_checkpoint
from distill.models.build import build_detector, count_parameters, gflops
from runtime.config import Pipeline, load_config
from runtime.data.classes import class_list
from runtime.errors import UserError

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
    """Write a model.pt of `role` with seeded random weights (kept while it still describes the pipeline's model, so
    deploy.build reuses its bundle); returns (path, parameters, GFLOPs)."""
    spec = (pipe.teacher if role == "teacher" else pipe.student).model_copy(update={"pretrained_backbone": False})
    classes = list(class_list(pipe.dataset.classes))
    torch.manual_seed(SEED)  # same bytes every time, so deploy.build reuses the bundle on the next run
    model = build_detector(spec, len(classes), pipe.input_size, score_thresh=pipe.test.score_thresh,
                           nms_thresh=pipe.test.nms_iou, detections_per_img=pipe.test.max_detections,
                           topk_candidates=pipe.test.topk_candidates).eval()
    meta = {"role": role, "method": method if role == "student" else None,
            "model_spec": spec.model_dump(mode="json"), "num_classes": len(classes), "classes": classes,
            "input_size": pipe.input_size, "config": pipe.as_dict(), "config_hash": "untrained"}
    if not _same_model(path, meta):
        save_checkpoint(path, model_payload(meta, model, {}, finished=False, untrained=True))
    return path, count_parameters(model), gflops(model, pipe.input_size)


def _same_model(path: Path, meta: dict) -> bool:
    """Whether the checkpoint at `path` holds the architecture, classes and input size `meta` describes."""
    if not path.is_file():
        return False
    try:
        old = load_checkpoint(path, mmap=True)
    except UserError:
        return False
    return all(old.get(k) == meta[k] for k in ("role", "model_spec", "classes", "input_size"))


def painted_classes(pipe: Pipeline) -> tuple[str, ...]:
    """The pipeline's classes the synthetic painter knows (all of DIOR's do), else its default classes: synthetic
    stand-in images then hold the pipeline's own objects, so the loader skips nothing."""
    from runtime.data.painters import SUPPORTED_CLASSES
    from runtime.data.synthetic import DEFAULT_CLASSES

    known = {c.lower() for c in SUPPORTED_CLASSES}
    return tuple(c for c in class_list(pipe.dataset.classes) if c.lower() in known) or DEFAULT_CLASSES


def calibration_for(pipe: Pipeline, data_dir: Path, images: int) -> Calibration:
    """Use the pipeline's training images when present (generating a synthetic set); else a synthetic stand-in."""
    # MinMax: ONNX Runtime's calibrators hold every activation of every calibration image in memory (gigabytes per
    # image for R101 at 800 px); the calibration method sets scales only, never the INT8 graph that is timed.
    common = [f"calibration.images={images}", "calibration.method=minmax"]
    if pipe.dataset.synthetic is not None or pipe.dataset_root.exists():
        return Calibration(common, f"INT8 calibrated (MinMax) on {images} images of the pipeline's own training "
                                   f"split ({pipe.dataset_root}).")
    from runtime.data.synthetic import SyntheticParams, generate

    params = SyntheticParams(seed=SEED, image_size=pipe.input_size, num_train=images, num_val=0, num_test=2,
                             classes=painted_classes(pipe))
    generate(params, data_dir)
    overrides = common + [f"dataset.root={data_dir.resolve()}", "dataset.synthetic=null", "dataset.format=dior",
                          "dataset.train_split=train", "dataset.test_split=test", "dataset.val_split=null",
                          "calibration.split=train", "deploy.eval_images=2"]
    note = (f"The pipeline's dataset is not on this machine ({pipe.dataset_root} is missing): INT8 was calibrated "
            f"(MinMax) on {images} synthetic images generated at the pipeline's input size ({pipe.input_size} px, "
            f"runtime.data.synthetic, in {data_dir}). Calibration ranges do not change the INT8 graph that is timed, "
            "but such an INT8 model must not be used for accuracy.")
    return Calibration(overrides, note)


def shared_overrides(overrides: Sequence[str]) -> list[str]:
    """The --set items that also apply to the sibling pipelines: all but the named pipeline's own `student.*` keys
    (a sibling keeps its own student; input size, dataset, calibration, teacher changes apply to every model)."""
    return [o for o in overrides if not o.split("=", 1)[0].strip().startswith("student.")]


def sibling_pipelines(pipe: Pipeline, config: Path | None = None, overrides: Sequence[str] = ()) -> list[Pipeline]:
    """The other pipelines that distil the same teacher on the same dataset at the same input size into a student of
    a different architecture (dior_retina's are dior_retina_edge and dior_retina_slim), in pipelines.yaml order.

    Their students are what a user chooses between, so latency-only reports time them side by side with this one's.
    Each candidate is resolved under `shared_overrides(overrides)` (the same --set items the named pipeline got).
    """
    shared = shared_overrides(overrides)
    seen = [pipe.student]
    out = []
    for name in pipe.project.pipelines:
        if name == pipe.name:
            continue
        other = load_config(config, shared, name).pipeline(name) if shared else pipe.project.pipeline(name)
        if (other.teacher == pipe.teacher and other.dataset == pipe.dataset and other.input_size == pipe.input_size
                and other.student not in seen):
            seen.append(other.student)
            out.append(other)
    return out


@dataclass(frozen=True)
class LatencyModel:
    """One network a latency-only report times: whose pipeline it comes from, its role, row name and folder."""

    pipe: Pipeline
    role: str
    name: str
    folder: str  # under the report's checkpoints/ and bundles/


def latency_models(pipe: Pipeline, own_student_only: bool = False, config: Path | None = None,
                   overrides: Sequence[str] = ()) -> list[LatencyModel]:
    """The pipeline's teacher and student, then (unless `own_student_only`) each sibling pipeline's student; the
    siblings resolved under the shared --set items (see sibling_pipelines)."""
    models = [LatencyModel(pipe, "teacher", "teacher", "teacher"), LatencyModel(pipe, "student", "student", "student")]
    siblings = [] if own_student_only else sibling_pipelines(pipe, config, overrides)
    return models + [LatencyModel(o, "student", f"student {o.name}", f"student-{o.name}") for o in siblings]


def describe_spec(spec) -> str:
    """A ModelSpec in a few words, e.g. 'mobilenet_v3_large FPN 128, 4 separable head convs'."""
    head = f"{spec.head_convs} {'separable ' if spec.head == 'separable' else ''}head convs"
    return f"{spec.backbone} FPN {spec.fpn_width}, {head}" if spec.arch == "retinanet" else \
        f"{spec.backbone} FPN {spec.fpn_width}"

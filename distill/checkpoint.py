"""Checkpoints: atomic writes, the model-checkpoint format every later layer reads, and `load_detector`.

A model checkpoint is a plain dict of primitives and tensors (loadable with ``torch.load(weights_only=True)``):
``format``, ``role`` ('teacher' | 'amplifier' | 'student'), ``method``, ``model_spec`` (dict), ``num_classes``,
``classes``, ``input_size``, ``config`` (the resolved pipeline, ``Pipeline.as_dict()``), ``config_hash``,
``metrics``, ``finished`` and ``state_dict`` (the produced network only). ``last.pt`` adds a ``resume`` dict
(optimizer, scheduler, scaler, RNG states, position in the schedule) for exact resume.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.errors import UserError
from runtime.manifest import file_sha256  # noqa: F401  (one sha256 for checkpoints and bundles)

FORMAT = "ds2d2-edge/1"
ROLES = ("teacher", "amplifier", "student")
MODEL_KEYS = ("format", "role", "method", "model_spec", "num_classes", "classes", "input_size", "config",
              "config_hash", "metrics", "finished", "state_dict")


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` with torch.save to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(payload), fh)
            fh.flush()
            os.fsync(fh.fileno())  # a SIGKILL or power loss right after the rename must not leave an empty file
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the checkpoint gets ordinary file permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _producer_hint(path: Path, pipeline: str | None) -> str:
    """The command that makes the checkpoint at ``path``, guessed from its stage directory name."""
    stage = path.parent.name
    if stage.startswith("student-"):
        flags = f"--stage student --method {stage.removeprefix('student-')}"
    elif stage in ("teacher", "amplifier"):
        flags = f"--stage {stage}"
    else:
        flags = "--stage teacher|amplifier|student"
    name = pipeline or (path.parent.parent.name if stage in ROLES or stage.startswith("student-") else "<pipeline>")
    return f"python -m distill.run {name} {flags}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", pipeline: str | None = None,
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict safely (weights_only); missing or unreadable files raise UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", where=str(path), fix=f"make it with `{_producer_hint(path, pipeline)}`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # garbage bytes make the (safe) unpickler fail in many ways: all mean "corrupt"
        raise UserError(f"checkpoint is corrupt or not a plain-tensor torch checkpoint ({type(exc).__name__})",
                        where=str(path), fix=f"delete it and rerun `{_producer_hint(path, pipeline)}` (an MMDetection "
                        "checkpoint must first be converted with `python -m distill.import_mmdet`)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"not a {FORMAT} checkpoint (format: {found!r})", where=str(path),
                        fix="pass a model.pt written by `python -m distill.run` (or converted by distill.import_mmdet)")
    return payload


def model_payload(meta: Mapping[str, Any], model: nn.Module, metrics: Mapping[str, Any], finished: bool,
                  **extra: Any) -> dict[str, Any]:
    """A model checkpoint dict: ``meta`` (format, role, spec, classes, config...) + this model's weights."""
    payload = {"format": FORMAT, **meta, "metrics": dict(metrics), "finished": bool(finished),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    payload.update(extra)
    missing = [k for k in MODEL_KEYS if k not in payload]
    if missing:
        raise ValueError(f"model checkpoint is missing {missing}")
    return payload


def thresholds_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """build_detector's test-time keyword arguments from a resolved pipeline dict's ``test`` section."""
    test = dict(config.get("test") or {})
    names = {"score_thresh": "score_thresh", "nms_iou": "nms_thresh", "max_detections": "detections_per_img",
             "topk_candidates": "topk_candidates"}
    return {ours: test[theirs] for theirs, ours in names.items() if theirs in test}


def build_from_meta(meta: Mapping[str, Any], **thresholds: Any) -> nn.Module:
    """An untrained network of the checkpoint's role and spec (the amplifier wraps a teacher-shaped detector)."""
    from distill.models import build_detector  # lazy: keeps this module light for tools that only read metadata
    from runtime.config import ModelSpec

    spec = ModelSpec(**{**meta["model_spec"], "pretrained_backbone": False})  # weights come from the state dict
    kwargs = thresholds_from_config(meta.get("config") or {}) | thresholds
    model = build_detector(spec, int(meta["num_classes"]), int(meta["input_size"]), **kwargs)
    if meta.get("role") == "amplifier":
        from distill.tasks import build_amplifier

        model = build_amplifier(model)
    return model


def load_detector(path: str | Path, map_location: str | torch.device = "cpu", **thresholds: Any
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network stored in a model checkpoint (eval mode) and return it with the metadata (no weights)."""
    path = Path(path)
    payload = load_checkpoint(path, map_location=map_location)
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "resume")}
    for key in ("role", "model_spec", "num_classes", "input_size", "state_dict"):
        if key not in payload:
            raise UserError(f"checkpoint has no '{key}'", where=str(path), fix="rewrite it with distill.run")
    model = build_from_meta(meta, **thresholds)
    result = model.load_state_dict(payload["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"weights do not fit a {meta['model_spec'].get('arch')}/{meta['model_spec'].get('backbone')} "
            f"{meta['role']} (missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})",
            where=str(path), fix="the checkpoint's model_spec and state_dict disagree; retrain or reconvert it")
    return model.to(map_location).eval(), meta

"""Reading MMDetection 3.x checkpoints (without mmdet / mmcv / mmengine) and mapping their keys onto torchvision.

Covers what the DS2D2 reference trains: ResNet / ResNeXt backbones (torchvision-style names), FPN (mmcv ConvModule
adds a `.conv` level), RetinaHead, RPNHead and Shared2FCBBoxHead. The R-CNN head's class layout differs: MMDetection
puts background *last* in fc_cls and has no background rows in fc_reg; torchvision has background at index 0 and
(num_classes + 1) * 4 box rows, so fc_cls rows are rotated and four zero rows are put in front of fc_reg.
DS2D2 training leftovers (`teacher.*`, `high_amplifier.*`, `distloss.*`) are dropped and reported.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import mmengine_pickle
from runtime.errors import UserError

DROPPED_PREFIXES = ("teacher.", "high_amplifier.", "distloss.")
ARCHS = ("retinanet", "faster_rcnn")
# (blocks per stage, bottleneck) -> backbone name; ResNeXt is told apart from ResNet-101 by its grouped 3x3 convs.
# Config settings (as written in a runner checkpoint's meta.cfg) that change outputs in ways weights do not show and
# the converted model does not reproduce: (pattern, what it means). Checked only when the checkpoint has its config.
UNSUPPORTED_SETTINGS = (
    (r"style\s*=\s*'caffe'", "caffe-style ResNet (stride on the 1x1 conv)"),
    (r"bgr_to_rgb\s*=\s*False", "trained on BGR input"),
    (r"relu_before_extra_convs\s*=\s*True", "ReLU before the extra FPN convs"),
    (r"add_extra_convs\s*=\s*'on_(?:output|lateral)'", "extra FPN levels not computed from C5"),
    (r"center_offset\s*=\s*0?\.5", "anchors centred at half a stride"),
    (r"octave_base_scale\s*=\s*(?!4\b)\d+", "RetinaNet anchors other than octave_base_scale=4"),
    (r"scales_per_octave\s*=\s*(?!3\b)\d+", "RetinaNet anchors other than 3 scales per octave"),
)
BACKBONE_DEPTHS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                   ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101"}


@dataclass
class MMDetCheckpoint:
    """An MMDetection checkpoint as read from disk: its fp32 state dict plus the runner metadata (if any)."""

    path: Path
    state_dict: dict[str, Tensor]
    meta: dict[str, Any]
    kind: str  # 'state_dict' (plain OrderedDict) or 'runner' (mmengine checkpoint with meta/state_dict/...)
    half_precision: bool  # the file stored floating tensors as fp16

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names from meta.dataset_meta (MMDetection 3.x) or meta.CLASSES (2.x), if the file has them."""
        names = (self.meta.get("dataset_meta") or {}).get("classes") or self.meta.get("CLASSES")
        return tuple(str(n) for n in names) if names else None


@dataclass
class InferredSpec:
    """The architecture a state dict describes, in ModelSpec terms plus the R-CNN head width."""

    arch: str
    backbone: str
    fpn_width: int
    num_classes: int
    head_convs: int | None = None  # RetinaNet stacked convs
    roi_fc_width: int | None = None  # Faster R-CNN shared FC width


@dataclass
class Conversion:
    """Torchvision-named tensors plus every source key that was dropped or could not be mapped."""

    state_dict: dict[str, Tensor]
    dropped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_errors: list[str] = field(default_factory=list)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # runner checkpoints reference numpy / mmengine globals: retry with the restricted unpickler
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=mmengine_pickle)
    except mmengine_pickle.RefusedGlobal as exc:
        raise UserError(f"checkpoint references code that is not allowed to run ({exc})", where=str(path),
                        fix="only MMDetection / MMEngine checkpoints are read; re-save the weights with "
                            "torch.save(model.state_dict(), path) if you trust the file") from None


def read_mmdet_checkpoint(path: str | Path) -> MMDetCheckpoint:
    """Load a plain MMDetection state dict or an MMEngine runner checkpoint safely; tensors come back as fp32."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", where=str(path), fix="pass the .pth written by MMDetection")
    try:
        raw = _torch_load(path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, pickle.UnpicklingError) as exc:
        raise UserError(f"not a readable torch checkpoint ({type(exc).__name__}: {exc})", where=str(path)) from None
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        state, meta, kind = raw["state_dict"], dict(raw.get("meta") or {}), "runner"
    elif isinstance(raw, Mapping) and raw and all(isinstance(v, Tensor) for v in raw.values()):
        state, meta, kind = raw, {}, "state_dict"
    else:
        raise UserError("no state dict in the checkpoint", where=str(path),
                        fix="pass an MMDetection checkpoint (a state dict, or a dict with 'state_dict')")
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    half = any(v.dtype == torch.float16 for v in tensors.values())
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}  # fp16 is exact in fp32
    return MMDetCheckpoint(path, tensors, meta, kind, half)


def unsupported_settings(meta: Mapping[str, Any]) -> list[str]:
    """Settings in the checkpoint's saved config that the torchvision model would not reproduce (empty if unknown)."""
    text = meta.get("cfg")
    if not isinstance(text, str):
        return []
    return [why for pattern, why in UNSUPPORTED_SETTINGS if re.search(pattern, text)]


def detect_arch(state_dict: Mapping[str, Tensor]) -> str:
    """'retinanet' (RetinaHead keys) or 'faster_rcnn' (RPNHead + Shared2FCBBoxHead keys)."""
    if "bbox_head.retina_cls.weight" in state_dict:
        return "retinanet"
    if "rpn_head.rpn_cls.weight" in state_dict and "roi_head.bbox_head.fc_cls.weight" in state_dict:
        return "faster_rcnn"
    raise UserError("neither a RetinaNet (bbox_head.retina_cls) nor a Faster R-CNN (rpn_head + roi_head.bbox_head) "
                    "state dict", fix="only MMDetection RetinaNet and Faster R-CNN (FPN) checkpoints are supported")


def infer_spec(state_dict: Mapping[str, Tensor], arch: str | None = None) -> InferredSpec:
    """Backbone, FPN width, head depth / width and class count, read from key names and tensor shapes."""
    arch = arch or detect_arch(state_dict)
    try:
        return _infer_spec(state_dict, arch)
    except KeyError as exc:
        raise UserError(f"the state dict has no {exc.args[0]!r}", fix="pass a complete ResNet-FPN RetinaNet / "
                        "Faster R-CNN checkpoint (backbone, neck and heads)") from None


def _infer_spec(state_dict: Mapping[str, Tensor], arch: str) -> InferredSpec:
    blocks = tuple(
        len({k.split(".")[2] for k in state_dict if k.startswith(f"backbone.layer{i}.")}) for i in (1, 2, 3, 4))
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict
    name = BACKBONE_DEPTHS.get((blocks, bottleneck))
    conv2 = state_dict.get("backbone.layer1.0.conv2.weight")
    if name == "resnet101" and conv2 is not None and conv2.shape[1] * 64 == conv2.shape[0]:
        name = "resnext101_64x4d"  # 64 groups of 4 channels in the 3x3 conv
    if name is None:
        raise UserError(f"unsupported backbone: {blocks} blocks per stage, bottleneck={bottleneck}",
                        fix="supported: ResNet-18/34/50/101 and ResNeXt-101 64x4d")
    fpn_width = int(state_dict["neck.fpn_convs.0.conv.weight"].shape[0])
    if arch == "retinanet":
        anchors = state_dict["bbox_head.retina_reg.weight"].shape[0] // 4
        convs = len({k.split(".")[2] for k in state_dict if k.startswith("bbox_head.cls_convs.")})
        return InferredSpec(arch, name, fpn_width, state_dict["bbox_head.retina_cls.weight"].shape[0] // anchors,
                            head_convs=convs)
    return InferredSpec(arch, name, fpn_width, state_dict["roi_head.bbox_head.fc_cls.weight"].shape[0] - 1,
                        roi_fc_width=int(state_dict["roi_head.bbox_head.shared_fcs.0.weight"].shape[0]))


def _background_first(t: Tensor) -> Tensor:
    # fc_cls rows: MMDetection [c0..c(C-1), bg] -> torchvision [bg, c0..c(C-1)]
    return torch.cat([t[-1:], t[:-1]])


def _with_background_deltas(num_classes: int) -> Callable[[Tensor], Tensor]:
    def convert(t: Tensor) -> Tensor:
        if t.shape[0] == 4:  # reg_class_agnostic: the same deltas serve every class
            t = t.repeat(num_classes, *([1] * (t.dim() - 1)))
        return torch.cat([t.new_zeros((4, *t.shape[1:])), t])  # torchvision decodes a (never used) background box

    return convert


def _rules(arch: str, num_laterals: int, num_classes: int) -> list[tuple[str, str, Callable[[Tensor], Tensor] | None]]:
    """(source regex, target template, tensor transform) in the order they are tried."""
    rules: list[tuple[str, str, Callable[[Tensor], Tensor] | None]] = [
        (r"backbone\.((?:conv1|bn1|layer[1-4])\..+)", r"backbone.body.\1", None),
        (r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", r"backbone.fpn.inner_blocks.\1.0.\2", None),
    ]
    rules += [(rf"neck\.fpn_convs\.{i}\.conv\.(weight|bias)", rf"backbone.fpn.layer_blocks.{i}.0.\1", None)
              for i in range(num_laterals)]
    if arch == "retinanet":
        rules += [
            (rf"neck\.fpn_convs\.{num_laterals}\.conv\.(weight|bias)", r"backbone.fpn.extra_blocks.p6.\1", None),
            (rf"neck\.fpn_convs\.{num_laterals + 1}\.conv\.(weight|bias)", r"backbone.fpn.extra_blocks.p7.\1", None),
            (r"bbox_head\.cls_convs\.(\d+)\.conv\.(weight|bias)", r"head.classification_head.conv.\1.0.\2", None),
            (r"bbox_head\.reg_convs\.(\d+)\.conv\.(weight|bias)", r"head.regression_head.conv.\1.0.\2", None),
            (r"bbox_head\.retina_cls\.(weight|bias)", r"head.classification_head.cls_logits.\1", None),
            (r"bbox_head\.retina_reg\.(weight|bias)", r"head.regression_head.bbox_reg.\1", None),
        ]
    else:
        rules += [
            (r"rpn_head\.rpn_conv\.(weight|bias)", r"rpn.head.conv.0.0.\1", None),
            (r"rpn_head\.rpn_cls\.(weight|bias)", r"rpn.head.cls_logits.\1", None),
            (r"rpn_head\.rpn_reg\.(weight|bias)", r"rpn.head.bbox_pred.\1", None),
            (r"roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)", r"roi_heads.box_head.fc6.\1", None),
            (r"roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)", r"roi_heads.box_head.fc7.\1", None),
            (r"roi_head\.bbox_head\.fc_cls\.(weight|bias)", r"roi_heads.box_predictor.cls_score.\1", _background_first),
            (r"roi_head\.bbox_head\.fc_reg\.(weight|bias)", r"roi_heads.box_predictor.bbox_pred.\1",
             _with_background_deltas(num_classes)),
        ]
    return rules


def map_state_dict(state_dict: Mapping[str, Tensor], arch: str | None = None) -> Conversion:
    """Rename (and where needed re-lay) MMDetection tensors to torchvision's names; list dropped and unmapped keys."""
    arch = arch or detect_arch(state_dict)
    num_laterals = len({k.split(".")[2] for k in state_dict if k.startswith("neck.lateral_convs.")})
    rules = [(re.compile(p), t, f) for p, t, f in _rules(arch, num_laterals, infer_spec(state_dict, arch).num_classes)]
    out = Conversion({})
    for key, value in state_dict.items():
        if key.startswith(DROPPED_PREFIXES):
            out.dropped.append(key)
            continue
        for pattern, template, transform in rules:
            match = pattern.fullmatch(key)
            if match:
                out.state_dict[match.expand(template)] = transform(value) if transform else value
                break
        else:
            out.unmapped.append(key)
    return out


def check_against(conversion: Conversion, model: nn.Module) -> Conversion:
    """Fill `missing`, `shape_errors` (and move keys the model lacks to `unmapped`) by comparing with `model`."""
    target = model.state_dict()
    for key in list(conversion.state_dict):
        if key.endswith("num_batches_tracked") and key not in target:
            del conversion.state_dict[key]  # FrozenBatchNorm2d keeps no step counter; nothing is lost
        elif key not in target:
            conversion.unmapped.append(f"{key} (no such tensor in the torchvision model)")
            del conversion.state_dict[key]
        elif tuple(conversion.state_dict[key].shape) != tuple(target[key].shape):
            conversion.shape_errors.append(
                f"{key}: checkpoint {tuple(conversion.state_dict[key].shape)} vs model {tuple(target[key].shape)}")
    conversion.missing = [k for k in target if k not in conversion.state_dict]
    return conversion


def load_converted(conversion: Conversion, model: nn.Module, where: str) -> nn.Module:
    """Load a checked conversion into `model` (strict); any unmapped, missing or misshapen key is a UserError."""
    problems = [(conversion.unmapped, "unmapped"), (conversion.missing, "missing"),
                (conversion.shape_errors, "wrong shape")]
    found = [f"{len(keys)} {what}: {', '.join(keys)}" for keys, what in problems if keys]
    if found:
        raise UserError("checkpoint does not map onto the torchvision model (" + "; ".join(found) + ")", where=where,
                        fix="check the pipeline's model (backbone, fpn_width, head_convs) and that the checkpoint is "
                            "a ResNet-FPN RetinaNet / Faster R-CNN as the DS2D2 reference trains")
    model.load_state_dict(conversion.state_dict, strict=True)
    return model

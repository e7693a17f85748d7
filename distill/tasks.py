"""What the trainer trains in each DS2D2 stage: a module whose forward returns every (weighted) loss term.

Contract for every task: `forward(images (B,3,S,S) in [0,1], targets) -> dict[str, Tensor]` (the trainer sums the
values and logs each), `.model` (the network the stage produces: save it, evaluate it with
`task.model.eval()(list(images))`), `trainable_parameters()`, and `checkpoint_modules()` (every module whose weights
change, for exact resume; only `model` is exported). Frozen parts stay in eval mode whatever `train()` is called with.

Detector-specific pieces live in one module per arch (ARCH_MODULES); see distill/ds2d2/implicit_retina.py.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from torch import Tensor, nn

from distill.baselines import fitnet_loss, pkd_loss
from distill.ds2d2.adapter import FeatureAdapter
from distill.ds2d2.explicit import ExplicitStream
from distill.models.backbones import fpn_features
from runtime.errors import UserError

ARCH_MODULES = {"RetinaNet": "distill.ds2d2.implicit_retina", "FasterRCNN": "distill.ds2d2.implicit_rcnn"}
METHODS = ("ds2d2", "fitnet", "pkd", "none")
STAGES = ("teacher", "amplifier", "student")


@dataclass(frozen=True)
class KDWeights:
    """DS2D2 loss weights (RetinaNet / DIOR row of the reference); runtime.config.DistillWeights has the same fields."""

    explicit_low: float = 1e-5
    explicit_high: float = 1e-5
    implicit_full: float = 1.0
    implicit_high: float = 1.0
    temperature: float = 3.0


def arch_module(model: nn.Module) -> ModuleType:
    """The DS2D2 module for this detector's class (torchvision RetinaNet / FasterRCNN or a subclass)."""
    for cls in type(model).__mro__:
        if cls.__name__ in ARCH_MODULES:
            return importlib.import_module(ARCH_MODULES[cls.__name__])
    raise NotImplementedError(f"no DS2D2 support for {type(model).__name__}; known: {sorted(ARCH_MODULES)}")


def build_amplifier(teacher: nn.Module, init_from_teacher: bool = True) -> nn.Module:
    """The stage-2 detector for a teacher (to train, or to load a stage-2 checkpoint into)."""
    return arch_module(teacher).amplifier_model(teacher, init_from_teacher)


def _freeze(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


class DetectorTask(nn.Module):
    """Plain detection training (teacher, or the no-KD student): torchvision's own losses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Detection loss terms of the batch."""
        return self.model(list(images), targets)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Modules whose weights training changes; `model` is the exported one."""
        return {"model": self.model}


class AmplifierTask(DetectorTask):
    """Stage 2: a copy of the teacher's head trained with the normal detection loss on hf(teacher FPN features).

    `.model` shares the (frozen) teacher backbone, so its checkpoint holds backbone + amplifier head: a complete
    detector on hf() features that evaluates like any other.
    """

    def __init__(self, teacher: nn.Module, init_from_teacher: bool = True):
        super().__init__(build_amplifier(teacher, init_from_teacher))


class DistillTask(DetectorTask):
    """Stage 3: student detection loss + KD terms ('ds2d2' | 'fitnet' | 'pkd' | 'none') from a frozen teacher.

    `.model` is the student only; teacher and amplifier are frozen (eval, no parameter grads) but gradients flow
    through them into the student's features. `adapter` maps student -> teacher width (None where unused).
    `weights`: the four DS2D2 weights (KDWeights / config DistillWeights); `baseline_weight` scales FitNet and PKD.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, amplifier_head: nn.Module | None, method: str,
                 weights=None, adapter: FeatureAdapter | None = None, baseline_weight: float = 1.0):
        super().__init__(student)
        if method not in METHODS:
            raise UserError(f"unknown distillation method {method!r}", where="--method", fix=f"use one of {METHODS}")
        if method == "ds2d2" and amplifier_head is None:
            raise UserError("DS2D2 needs the stage-2 amplifier", where="student stage",
                            fix="train the amplifier stage first or pass its checkpoint")
        s_width, t_width = student.backbone.out_channels, teacher.backbone.out_channels
        if adapter is None and (method in ("ds2d2", "fitnet") or s_width != t_width) and method != "none":
            raise UserError(f"method {method!r} with widths {s_width}->{t_width} needs an adapter", where="DistillTask")
        weights = weights if weights is not None else KDWeights()
        self.method, self.adapter, self.baseline_weight = method, adapter, baseline_weight
        self.widths_differ = s_width != t_width
        self.arch = arch_module(student)
        self.teacher = _freeze(teacher)
        self.amplifier_head = _freeze(amplifier_head) if amplifier_head is not None else None
        if method == "ds2d2":
            self.explicit = ExplicitStream(weights.explicit_low, weights.explicit_high)
            self.implicit = self.arch.ImplicitStream(self.teacher, self.amplifier_head, weights)

    def train(self, mode: bool = True) -> "DistillTask":
        """Train the student (and adapter); teacher and amplifier stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        if self.amplifier_head is not None:
            self.amplifier_head.eval()
        return self

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Student (exported) and adapter (resume only)."""
        return {"model": self.model} | ({"adapter": self.adapter} if self.adapter is not None else {})

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Student detection terms plus the weighted KD terms of `method`, on one transformed batch."""
        batch, targets = self.model.transform(list(images), targets)  # student and teacher see the same tensor
        losses, s_feats, state = self.arch.train_step(self.model, batch, targets)
        if self.method == "none":
            return losses
        t_feats = [f.detach() for f in fpn_features(self.teacher, batch.tensors)]
        adapted = self.adapter(s_feats) if self.adapter is not None else s_feats
        if self.method == "fitnet":
            return losses | {"kd_fitnet": self.baseline_weight * fitnet_loss(adapted, t_feats)}
        if self.method == "pkd":
            return losses | {"kd_pkd": self.baseline_weight * pkd_loss(adapted, t_feats)}
        boxes = [t["boxes"] for t in targets]
        losses |= self.explicit(adapted, t_feats, boxes, batch.tensors.shape[-2:])
        # The teacher head expects teacher width: adapt only when widths differ (the reference feeds S as is).
        return losses | self.implicit(adapted if self.widths_differ else s_feats, t_feats, state)


def make_adapter(method: str, student: nn.Module, teacher: nn.Module, mode: str = "shared") -> FeatureAdapter | None:
    """The adapter a method needs: always for ds2d2/fitnet, for pkd only when widths differ, never for none."""
    s_width, t_width = student.backbone.out_channels, teacher.backbone.out_channels
    if method == "none" or (method == "pkd" and s_width == t_width):
        return None
    return FeatureAdapter(s_width, t_width, arch_module(student).NUM_LEVELS, mode)


def build_task(stage: str, *, model: nn.Module | None = None, teacher: nn.Module | None = None,
               amplifier: nn.Module | None = None, method: str = "ds2d2", weights=None, adapter: str = "shared",
               baseline_weight: float = 1.0, init_from_teacher: bool = True) -> DetectorTask:
    """The task for a stage (arguments mirror runtime.config's DistillConfig / AmplifierSpec).

    teacher: `model`. amplifier: `teacher`, `init_from_teacher`. student: `model` (the student), `teacher`,
    `amplifier` (the stage-2 detector, needed for ds2d2), `method`, `weights`, `adapter` ('shared' | 'per_level'),
    `baseline_weight` (FitNet / PKD).
    """
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}", where="--stage", fix=f"use one of {STAGES}")
    needed = {"teacher": ("model",), "amplifier": ("teacher",),
              "student": ("model",) + (("teacher",) if method != "none" else ())}
    missing = [n for n in needed[stage] if {"model": model, "teacher": teacher}[n] is None]
    if missing:
        raise UserError(f"stage {stage!r} needs {', '.join(missing)}", where="build_task")
    if stage == "teacher" or (stage == "student" and method == "none"):
        return DetectorTask(model)
    if stage == "amplifier":
        return AmplifierTask(teacher, init_from_teacher)
    head = arch_module(teacher).amplifier_part(amplifier) if amplifier is not None else None
    return DistillTask(model, teacher, head, method, weights, make_adapter(method, model, teacher, adapter),
                       baseline_weight)

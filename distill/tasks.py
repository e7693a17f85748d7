"""What the trainer trains in each DS2D2 stage: a module whose forward returns every (weighted) loss term.

Contract for every task: `forward(images (B,3,S,S) in [0,1], targets) -> dict[str, Tensor]` (the trainer sums the
values and logs each), `.model` (the network the stage produces: save it, evaluate it with
`task.model.eval()(list(images))`), `trainable_parameters()`, and `checkpoint_modules()` (every module whose weights
change, for exact resume; only `model` is exported). Frozen parts stay in eval mode whatever `train()` is called with.

Detector-specific pieces live in one module per arch (ARCH_MODULES); see distill/ds2d2/implicit_retina.py.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from torch import Tensor, nn

from distill.ds2d2.adapter import FeatureAdapter
from distill.ds2d2.explicit import ExplicitStream
from distill.kd import FGDLoss, fitnet_loss, pkd_loss
from distill.models.backbones import fpn_features
from runtime.config import DISTILL_METHODS, DistillConfig, DistillWeights
from runtime.errors import UserError

ARCH_MODULES = {"RetinaNet": "distill.ds2d2.implicit_retina", "FasterRCNN": "distill.ds2d2.implicit_rcnn"}
METHODS = DISTILL_METHODS
STAGES = ("teacher", "amplifier", "student")
# DS2D2's 1x1 conv and FitNet's regressor always exist; PKD and FGD distil the student map as it is when the widths
# agree (mmrazor's setting) and through the same 1x1 adapter when they do not.
ALWAYS_ADAPTED = ("ds2d2", "fitnet")


def default_distill() -> DistillConfig:
    """The distill section used when none is given: the reference's RetinaNet / DIOR weights, defaults elsewhere."""
    return DistillConfig(weights=DistillWeights(explicit_low=1e-5, explicit_high=1e-5, implicit_full=1.0,
                                                implicit_high=1.0))


def arch_module(model: nn.Module) -> ModuleType:
    """The DS2D2 module for this detector's class (torchvision RetinaNet / FasterRCNN or a subclass)."""
    for cls in type(model).__mro__:
        if cls.__name__ in ARCH_MODULES:
            return importlib.import_module(ARCH_MODULES[cls.__name__])
    raise NotImplementedError(f"no DS2D2 support for {type(model).__name__}; known: {sorted(ARCH_MODULES)}")


def build_amplifier(teacher: nn.Module, init_from_teacher: bool = True) -> nn.Module:
    """The stage-2 detector for a teacher (to train, or to load a stage-2 checkpoint into)."""
    return arch_module(teacher).amplifier_model(teacher, init_from_teacher)


def distilled_levels(method: str, distill: DistillConfig, num_levels: int) -> list[int]:
    """The FPN levels a method distils: all for ds2d2/fitnet, `pkd.levels`, `fgd.levels` (None: all)."""
    chosen = {"pkd": distill.pkd.levels, "fgd": distill.fgd.levels}.get(method) or list(range(num_levels))
    bad = [level for level in chosen if not 0 <= level < num_levels]
    if bad or len(set(chosen)) != len(chosen):
        raise UserError(f"{method} levels {chosen} are not distinct FPN levels 0..{num_levels - 1}",
                        where=f"distill.{method}.levels", fix=f"list levels between 0 and {num_levels - 1}")
    return list(chosen)


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
    """Stage 2: copies of the teacher's heads trained with the normal detection loss on hf(teacher FPN features).

    `.model` shares the (frozen) teacher backbone, so its checkpoint holds backbone + amplifier heads: a complete
    detector on hf() features that evaluates like any other.
    """

    def __init__(self, teacher: nn.Module, init_from_teacher: bool = True):
        super().__init__(build_amplifier(teacher, init_from_teacher))


class DistillTask(DetectorTask):
    """Stage 3: student detection loss + the KD terms of `method` ('ds2d2' | 'fitnet' | 'pkd' | 'fgd' | 'none').

    `.model` is the student only; teacher and amplifier are frozen (eval, no parameter grads) but gradients flow
    through them into the student's features. `distill` (runtime.config.DistillConfig) holds every method's weights;
    `adapter` maps the distilled student levels to the teacher's width (None where unused). FGD's GcBlocks and the
    adapter are trained with the student, saved for exact resume and never exported.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, amplifier_head: nn.Module | None, method: str,
                 distill: DistillConfig | None = None, adapter: FeatureAdapter | None = None):
        super().__init__(student)
        if method not in METHODS:
            raise UserError(f"unknown distillation method {method!r}", where="--method", fix=f"use one of {METHODS}")
        if method == "ds2d2" and amplifier_head is None:
            raise UserError("DS2D2 needs the stage-2 amplifier", where="student stage",
                            fix="train the amplifier stage first or pass its checkpoint")
        distill = distill if distill is not None else default_distill()
        s_width, t_width = student.backbone.out_channels, teacher.backbone.out_channels
        if adapter is None and method != "none" and (method in ALWAYS_ADAPTED or s_width != t_width):
            raise UserError(f"method {method!r} with widths {s_width}->{t_width} needs an adapter", where="DistillTask")
        self.method, self.adapter, self.distill = method, adapter, distill
        self.widths_differ = s_width != t_width
        self.arch = arch_module(student)
        self.levels = distilled_levels(method, distill, self.arch.NUM_LEVELS)
        self.teacher = _freeze(teacher)
        self.amplifier_head = _freeze(amplifier_head) if amplifier_head is not None else None
        if method == "ds2d2":
            w = distill.weights
            self.explicit = ExplicitStream(w.explicit_low, w.explicit_high, distill.explicit_norm)
            self.implicit = self.arch.ImplicitStream(self.teacher, self.amplifier_head, distill)
        elif method == "fgd":
            f = distill.fgd
            self.fgd = FGDLoss(t_width, len(self.levels), f.temperature, f.alpha, f.beta, f.gamma, f.lambda_)
        self.pkd_weight = distill.pkd.weight if distill.pkd.weight is not None else self.arch.PKD_WEIGHT

    def train(self, mode: bool = True) -> "DistillTask":
        """Train the student (and adapter, FGD's GcBlocks); teacher and amplifier stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        if self.amplifier_head is not None:
            self.amplifier_head.eval()
        return self

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Student (exported), adapter and FGD's GcBlocks (resume only)."""
        extra = {"adapter": self.adapter} if self.adapter is not None else {}
        return {"model": self.model} | extra | ({"fgd": self.fgd} if self.method == "fgd" else {})

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Student detection terms plus the weighted KD terms of `method`, on one transformed batch."""
        batch, targets = self.model.transform(list(images), targets)  # student and teacher see the same tensor
        losses, s_feats, state = self.arch.train_step(self.model, batch, targets)
        if self.method == "none":
            return losses
        t_all = [f.detach() for f in fpn_features(self.teacher, batch.tensors)]
        student = [s_feats[level] for level in self.levels]
        teacher = [t_all[level] for level in self.levels]
        adapted = self.adapter(student) if self.adapter is not None else student
        boxes, padded = [t["boxes"] for t in targets], batch.tensors.shape[-2:]
        if self.method == "fitnet":
            normalize = self.distill.explicit_norm == "teacher_energy"
            return losses | {"kd_fitnet": self.distill.fitnet.weight * fitnet_loss(adapted, teacher, normalize)}
        if self.method == "pkd":
            return losses | {"kd_pkd": self.pkd_weight * pkd_loss(adapted, teacher)}
        if self.method == "fgd":
            return losses | self.fgd(adapted, teacher, boxes, padded)
        losses |= self.explicit(adapted, teacher, boxes, padded)
        # The teacher head expects teacher width: adapt only when widths differ (the reference feeds S as is).
        return losses | self.implicit(adapted if self.widths_differ else s_feats, t_all, state)


def make_adapter(method: str, student: nn.Module, teacher: nn.Module, mode: str = "shared",
                 distill: DistillConfig | None = None) -> FeatureAdapter | None:
    """The adapter a method needs (always for ds2d2/fitnet, for pkd/fgd only when widths differ, never for none),
    with one conv per distilled level in 'per_level' mode."""
    s_width, t_width = student.backbone.out_channels, teacher.backbone.out_channels
    if method == "none" or (method not in ALWAYS_ADAPTED and s_width == t_width):
        return None
    levels = distilled_levels(method, distill or default_distill(), arch_module(student).NUM_LEVELS)
    return FeatureAdapter(s_width, t_width, len(levels), mode)


def build_task(stage: str, *, model: nn.Module | None = None, teacher: nn.Module | None = None,
               amplifier: nn.Module | None = None, method: str = "ds2d2", distill: DistillConfig | None = None,
               weights: DistillWeights | None = None, adapter: str | None = None,
               init_from_teacher: bool = True) -> DetectorTask:
    """The task for a stage (arguments mirror runtime.config's DistillConfig / AmplifierSpec).

    teacher: `model`. amplifier: `teacher`, `init_from_teacher`. student: `model` (the student), `teacher`,
    `amplifier` (the stage-2 detector, needed for ds2d2), `method`, `distill` (the pipeline's distill section; default
    `default_distill()`), and optionally `weights` / `adapter` ('shared' | 'per_level') replacing its fields.
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
    distill = distill if distill is not None else default_distill()
    update = {k: v for k, v in (("weights", weights), ("adapter", adapter)) if v is not None}
    distill = distill.model_copy(update=update) if update else distill
    head = arch_module(teacher).amplifier_part(amplifier) if amplifier is not None else None
    return DistillTask(model, teacher, head, method, distill,
                       make_adapter(method, model, teacher, distill.adapter, distill))

"""pipelines.yaml: the one typed loader every CLI uses.

Validation errors name the key path and the line in the file; `--set a.b=c` overrides go through the same checks.
A key path given to `--set` that does not start with a top-level section is relative to the selected pipeline, and
walking into a pipeline's `dataset`/`teacher`/`student` reference inlines a copy of the referenced entry first.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "pipelines.yaml"
TOP_LEVEL = ("default_pipeline", "work_dir", "artifacts_dir", "datasets", "models", "pipelines", "targets")


class Strict(BaseModel):
    """Base for every config section: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class AnchorConfig(Strict):
    """Anchor boxes of a detector (RetinaNet, or the RPN of Faster R-CNN), in network-input pixels.

    `sizes` has one list per FPN level, finest first (RetinaNet P3-P7, Faster R-CNN P2-P6), each with the same number
    of sizes; `aspect_ratios` are height / width. Fit them to the objects with `python -m runtime.data stats`.
    """

    sizes: list[list[float]] = Field(min_length=1)
    aspect_ratios: list[float] = Field([0.5, 1.0, 2.0], min_length=1)

    @model_validator(mode="after")
    def _same_count_per_level(self) -> AnchorConfig:
        if any(len(level) != len(self.sizes[0]) or not level for level in self.sizes):
            raise ValueError("every level needs the same (non-zero) number of sizes: the head predicts a fixed count")
        if min(min(level) for level in self.sizes) <= 0 or min(self.aspect_ratios) <= 0:
            raise ValueError("anchor sizes and aspect ratios must be positive")
        return self


class AssignConfig(Strict):
    """IoU thresholds of the anchor-to-object assignment: foreground >= fg_iou, background < bg_iou, in between
    ignored; every object also keeps its best anchor (low-quality match). Applies to RetinaNet's head and to the RPN
    of Faster R-CNN (reference: 0.5 / 0.4 and 0.7 / 0.3)."""

    fg_iou: float = Field(gt=0, le=1)
    bg_iou: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> AssignConfig:
        if self.bg_iou > self.fg_iou:
            raise ValueError(f"bg_iou ({self.bg_iou}) must not exceed fg_iou ({self.fg_iou})")
        return self


class ModelSpec(Strict):
    """A detector: architecture, backbone, FPN width, head depth, anchors, initialisation and normalisation."""

    arch: Literal["retinanet", "faster_rcnn"]
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnext101_64x4d", "mobilenet_v3_large"]
    fpn_width: int = Field(256, gt=0)
    head_convs: int = Field(4, ge=1)
    head: Literal["conv", "separable"] = "conv"  # RetinaNet: full 3x3 head convs, or depthwise-separable (edge)
    pretrained_backbone: bool = False
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    roi_fc_width: int = Field(1024, gt=0)  # Faster R-CNN: width of the two shared FCs of the RoI box head
    mmdet_compat: bool = False  # set by distill.import_mmdet: reproduce MMDetection's conventions exactly
    anchors: AnchorConfig | None = None  # None: the reference's (RetinaNet 4 x stride x 2^(i/3); RPN 8 x stride)
    assign: AssignConfig | None = None  # None: the reference's thresholds
    box_loss: Literal["l1", "smooth_l1", "giou", "diou", "ciou"] = "l1"  # RetinaNet's regression loss (reference: l1)
    # RetinaNet's FPN levels [finest, coarsest] (P_l has stride 2^l): reference [3, 7]; [2, 6] adds the stride-4
    # level that objects of ~10 px need. Faster R-CNN is fixed at P2-P6.
    fpn_levels: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _levels_and_anchors(self) -> ModelSpec:
        from runtime.anchors import DEFAULT_LEVELS  # lazy: keeps this module's imports light

        low, high = self.fpn_levels or DEFAULT_LEVELS[self.arch]
        if self.fpn_levels is not None and self.arch != "retinanet" and tuple(self.fpn_levels) != (2, 6):
            raise ValueError("fpn_levels is a RetinaNet setting (Faster R-CNN uses P2-P6)")
        if not (2 <= low <= 3 and 6 <= high <= 7):
            raise ValueError(f"fpn_levels must run from P2 or P3 to P6 or P7, got [{low}, {high}]")
        levels = high - low + 1
        if self.anchors is not None and len(self.anchors.sizes) != levels:
            raise ValueError(f"anchors.sizes has {len(self.anchors.sizes)} levels, {self.arch} has {levels} "
                             f"(finest first: P{low}-P{high})")
        return self


class AmplifierSpec(Strict):
    """The stage-2 high-frequency amplifier: a copy of the teacher head trained on hf(teacher features)."""

    init_from_teacher: bool = True


class StageSchedule(Strict):
    """Optimiser and learning-rate schedule of one training stage."""

    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(gt=0)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = Field(500, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    milestones: list[int] = []
    gamma: float = 0.1
    clip_grad: float | None = None
    eval_every: int = Field(1, ge=1)
    amp: bool = True
    workers: int = Field(2, ge=0)
    seed: int = 0
    augment_flip: bool = True
    # last.pt (weights + optimizer state, for exact --resume) this many times per epoch, and at every epoch end
    checkpoints_per_epoch: int = Field(4, ge=1)


class ScheduleConfig(Strict):
    """One schedule per stage."""

    teacher: StageSchedule
    amplifier: StageSchedule
    student: StageSchedule


class DistillWeights(Strict):
    """The DS2D2 loss weights: explicit low/high band, implicit full/high-frequency amplifier.

    As in the reference, one implicit weight scales both the cls and the box term of its amplifier; `implicit_*_box`
    (optional) give the box term its own weight when the two terms live on very different scales.
    """

    explicit_low: float = Field(ge=0)
    explicit_high: float = Field(ge=0)
    implicit_full: float = Field(ge=0)
    implicit_high: float = Field(ge=0)
    implicit_full_box: float | None = Field(None, ge=0)  # None: implicit_full
    implicit_high_box: float | None = Field(None, ge=0)  # None: implicit_high

    def implicit(self, amplifier: Literal["full", "high"]) -> tuple[float, float]:
        """(cls weight, box weight) of the 'full' or 'high' amplifier's implicit terms."""
        cls = getattr(self, f"implicit_{amplifier}")
        box = getattr(self, f"implicit_{amplifier}_box")
        return cls, cls if box is None else box


class FitNetConfig(Strict):
    """FitNet: MSE between adapted student and teacher FPN maps (normalised like DS2D2's explicit terms)."""

    weight: float = Field(1.0, ge=0)


class PKDConfig(Strict):
    """PKD (Pearson correlation) on the listed FPN levels; weight None = mmrazor's (RetinaNet 10, Faster R-CNN 6)."""

    weight: float | None = Field(None, ge=0)
    levels: list[int] = [0, 1, 2, 3]


class FGDConfig(Strict):
    """FGD (focal and global distillation); defaults: mmrazor's RetinaNet setting. levels None = every FPN level."""

    model_config = ConfigDict(populate_by_name=True)
    temperature: float = Field(0.5, gt=0)
    alpha: float = Field(1e-3, ge=0)  # foreground feature loss
    beta: float = Field(5e-4, ge=0)  # background feature loss
    gamma: float = Field(5e-4, ge=0)  # attention (mask) loss
    lambda_: float = Field(5e-6, ge=0, alias="lambda")  # global relation loss
    levels: list[int] | None = None


DistillMethod = Literal["ds2d2", "none", "fitnet", "pkd", "fgd"]
DISTILL_METHODS: tuple[str, ...] = get_args(DistillMethod)


class DistillConfig(Strict):
    """Distillation method, DS2D2's weights, and each baseline's own setting."""

    method: DistillMethod = "ds2d2"
    weights: DistillWeights
    # raw: the reference's MSE on Haar coefficients; teacher_energy: each level's term divided by the detached mean
    # square of the teacher's band, so the weights do not depend on the feature scale (FitNet follows the same rule)
    explicit_norm: Literal["raw", "teacher_energy"] = "raw"
    adapter: Literal["shared", "per_level"] = "shared"
    temperature: float = Field(3.0, gt=0)
    fitnet: FitNetConfig = FitNetConfig()
    pkd: PKDConfig = PKDConfig()
    fgd: FGDConfig = FGDConfig()


class TestConfig(Strict):
    """Detection thresholds at test time (the reference's: 0.05, NMS 0.5, 100 boxes, 1000 candidates per level)."""

    __test__ = False  # not a pytest class
    score_thresh: float = Field(0.05, ge=0, le=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_detections: int = Field(100, gt=0)
    topk_candidates: int = Field(1000, gt=0)


class CalibrationConfig(Strict):
    """INT8 calibration: how many training images, which split, which algorithm.

    Left unset, ``images`` is 500 (or the whole split when it has fewer); set, it is exact. ``per_node`` makes
    modelopt calibrate one node at a time (least memory, more time).
    """

    images: int = Field(500, gt=0)
    split: str = "train"
    method: Literal["entropy", "max", "minmax", "percentile"] = "entropy"
    seed: int = 0
    per_node: bool = False

    @field_validator("split")
    @classmethod
    def _never_test(cls, value: str) -> str:
        if "test" in value.lower():
            raise ValueError("calibration must use a training split, never the test split")
        return value


class DeployConfig(Strict):
    """Export and accuracy-gate settings."""

    opset: int = Field(17, ge=17)
    dynamic_batch: bool = False
    fidelity_atol: float = Field(1e-3, gt=0)
    fidelity_rtol: float = Field(1e-3, ge=0)
    # AP50 points INT8 may lose against FP32 on the test split. A negative limit demands that INT8 beat FP32 by that
    # much, which no honest model does: `--set deploy.ap50_drop_limit=-1` drives the gate's failure path on purpose.
    ap50_drop_limit: float = Field(1.0, ge=-100)
    sensitivity_groups: int = Field(8, ge=1)
    eval_images: int | None = Field(None, gt=0)


class DatasetConfig(Strict):
    """Where a dataset lives, its format, splits and classes; `synthetic` makes it generated on demand."""

    format: Literal["dior", "dota", "coco"]
    root: str
    train_split: str
    test_split: str
    val_split: str | None = None
    classes: str | list[str] = "dior"
    synthetic: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_synthetic(self) -> DatasetConfig:
        if self.synthetic is not None:
            from runtime.data.synthetic import SyntheticParams  # lazy: the data layer imports this module

            SyntheticParams(**self.synthetic)
        return self


class PipelineSpec(Strict):
    """A pipeline as written: references (or inline entries) plus its own sections."""

    description: str = ""
    dataset: str | DatasetConfig
    teacher: str | ModelSpec
    student: str | ModelSpec
    amplifier: AmplifierSpec = AmplifierSpec()
    input_size: int = Field(gt=0)
    distill: DistillConfig
    schedule: ScheduleConfig
    test: TestConfig = TestConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    deploy: DeployConfig = DeployConfig()

    @field_validator("input_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"input_size must be a multiple of 32 (the FPN's largest stride), got {value}")
        return value


class TargetConfig(Strict):
    """A deploy target: the runtime it feeds and the engine settings it needs."""

    description: str = ""
    runtime: Literal["tensorrt", "onnxruntime"]
    input_size: int | None = Field(None, gt=0)
    precision: Literal["int8", "fp16", "fp32"] = "int8"
    workspace_mb: int = Field(2048, gt=0)
    dla_core: int | None = Field(None, ge=0)
    trt_major: int | None = Field(None, ge=8)
    quantizer: Literal["ort-u8s8", "modelopt", "ort-symmetric"] = "modelopt"
    # Where the engine runs: deploy.build builds it on the host only when the host is this platform (or --engine build).
    platform: Literal["jetson", "x86-cuda"] | None = None
    version_compatible: bool = False  # trtexec --versionCompatible: runs on newer TensorRT of the same major
    hardware_compatibility: Literal["none", "ampere+"] = "none"  # trtexec --hardwareCompatibilityLevel (not Jetson)


class ProjectConfig(Strict):
    """The whole of pipelines.yaml."""

    default_pipeline: str
    work_dir: str = "runs"
    artifacts_dir: str = "artifacts"
    datasets: dict[str, DatasetConfig]
    models: dict[str, ModelSpec]
    pipelines: dict[str, PipelineSpec]
    targets: dict[str, TargetConfig]
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _check_references(self) -> ProjectConfig:
        if self.default_pipeline not in self.pipelines:
            raise ValueError(f"default_pipeline '{self.default_pipeline}' is not a pipeline")
        for name, pipe in self.pipelines.items():
            for key, table in (("dataset", self.datasets), ("teacher", self.models), ("student", self.models)):
                ref = getattr(pipe, key)
                if isinstance(ref, str) and ref not in table:
                    raise _Dangling(("pipelines", name, key), f"'{ref}' is not defined (known: {', '.join(table)})")
        return self

    def pipeline(self, name: str | None = None) -> Pipeline:
        """The named (or default) pipeline with every reference resolved."""
        name = name or self.default_pipeline
        if name not in self.pipelines:
            raise UserError(f"unknown pipeline '{name}'", fix=f"choose one of: {', '.join(self.pipelines)}")
        spec = self.pipelines[name]
        return Pipeline(
            name=name,
            spec=spec,
            dataset=self.datasets[spec.dataset] if isinstance(spec.dataset, str) else spec.dataset,
            teacher=self.models[spec.teacher] if isinstance(spec.teacher, str) else spec.teacher,
            student=self.models[spec.student] if isinstance(spec.student, str) else spec.student,
            project=self,
        )

    def target(self, name: str) -> TargetConfig:
        """The named deploy target; unknown names list the known ones."""
        if name not in self.targets:
            raise UserError(f"unknown target '{name}'", fix=f"choose one of: {', '.join(self.targets)}")
        return self.targets[name]

    def path(self, relative: str | Path) -> Path:
        """A path from the config, resolved against the directory of pipelines.yaml."""
        p = Path(relative)
        return p if p.is_absolute() else (self.base_dir / p)


@dataclass(frozen=True)
class Pipeline:
    """A resolved pipeline: its spec plus the dataset and model entries it references."""

    name: str
    spec: PipelineSpec
    dataset: DatasetConfig
    teacher: ModelSpec
    student: ModelSpec
    project: ProjectConfig

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__") or item == "spec":
            raise AttributeError(item)
        # distill, schedule, test, calibration, deploy, input_size, amplifier come straight from the spec
        return getattr(self.spec, item)

    @property
    def dataset_root(self) -> Path:
        """The dataset root as an absolute path."""
        return self.project.path(self.dataset.root)

    @property
    def work_dir(self) -> Path:
        """Where this pipeline's checkpoints, logs and summaries go."""
        return self.project.path(self.project.work_dir) / self.name

    def as_dict(self) -> dict[str, Any]:
        """The fully resolved pipeline as plain data (stored in checkpoints and hashed for stage reuse)."""
        data = self.spec.model_dump(mode="json")
        data.update(
            name=self.name,
            dataset=self.dataset.model_dump(mode="json"),
            teacher=self.teacher.model_dump(mode="json"),
            student=self.student.model_dump(mode="json"),
        )
        return data


class _Dangling(ValueError):
    def __init__(self, loc: tuple[str, ...], msg: str):
        self.loc = loc
        super().__init__(msg)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                pipeline: str | None = None) -> ProjectConfig:
    """Read, override and validate pipelines.yaml; any problem is one UserError naming key path and line."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError("config file not found", where=str(path), fix="run from the repository root or pass --config")
    text = path.read_text()
    try:
        root_node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=where) from None
    if not isinstance(raw, dict):
        raise UserError("expected a mapping at the top level", where=str(path))
    overridden: set[tuple[str, ...]] = set()
    for item in overrides:
        overridden.add(_apply_override(raw, item, pipeline))
    try:
        return ProjectConfig(**raw, base_dir=path.resolve().parent)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _Dangling):
            loc = ctx_error.loc
        msg = str(ctx_error) if ctx_error is not None else err["msg"]
        key = ".".join(loc) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        where = f"{path}:{_line_of(root_node, loc)}" if _line_of(root_node, loc) else str(path)
        if any(loc[: len(o)] == o for o in overridden):
            where = f"--set {'.'.join(loc)}"
        raise UserError(f"{key}: {msg}{more}", where=where, fix="see the other pipelines in pipelines.yaml for the schema") from None


def _apply_override(raw: dict, item: str, pipeline: str | None) -> tuple[str, ...]:
    """Apply one `a.b=c` override in place; returns the absolute key path it touched."""
    if "=" not in item:
        raise UserError(f"override '{item}' is not KEY=VALUE", where="--set", fix="e.g. --set schedule.student.epochs=2")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] not in TOP_LEVEL:
        pipe = pipeline or raw.get("default_pipeline")
        if pipe not in raw.get("pipelines", {}):
            raise UserError(f"override '{key}' is relative to a pipeline, but '{pipe}' is not one", where="--set")
        parts = ["pipelines", pipe, *parts]
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise UserError(f"cannot set '{key}': '{'.'.join(parts[:depth])}' is not a mapping", where="--set")
        child = node.get(part)
        if isinstance(child, str) and depth >= 2 and parts[0] == "pipelines" and part in ("dataset", "teacher", "student"):
            table = raw.get("datasets" if part == "dataset" else "models", {})
            child = copy.deepcopy(table.get(child, {}))  # inline the referenced entry so only this pipeline changes
            node[part] = child
        elif child is None:
            child = node[part] = {}
        node = child
    if not isinstance(node, dict):
        raise UserError(f"cannot set '{key}': its parent is not a mapping", where="--set")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return tuple(parts)


def _line_of(node: yaml.Node | None, loc: tuple[str, ...]) -> int | None:
    """1-based line of the deepest YAML node on the key path `loc`."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if str(k.value) == part), None)
            if nxt is None:
                key_node = next((k for k, _ in node.value if str(k.value) == part), None)
                return key_node.start_mark.line + 1 if key_node else line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            break
        line = node.start_mark.line + 1
    return line


def add_config_args(parser: Any, with_pipeline: bool = True) -> None:
    """Add --config and --set (and the pipeline argument) to an argparse parser, listing pipeline names."""
    try:
        names = ", ".join(yaml.safe_load(DEFAULT_CONFIG.read_text()).get("pipelines", {}))
    except Exception:  # the help text must never fail; load_config reports problems properly
        names = "see pipelines.yaml"
    if with_pipeline:
        parser.add_argument("pipeline", nargs="?", default=None, help=f"pipeline name (default from pipelines.yaml): {names}")
    parser.add_argument("--config", default=None, help="path to pipelines.yaml (default: the repository's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set schedule.student.epochs=2 (validated like the file)")

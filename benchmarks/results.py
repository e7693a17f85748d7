"""The report's data: one `Row` per measured model variant and the `Context` every number was measured in.

`results.json` is `Results.as_dict()`; plots and the Markdown/HTML renderer read only these types, so a report can be
re-rendered from its JSON without measuring again.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.atomic import write_bytes_atomic

UNTRAINED = "latency only — untrained weights"


@dataclass
class Row:
    """One model variant (role, KD method, precision) measured on one backend."""

    name: str
    role: str                      # 'teacher' | 'student'
    method: str | None             # KD method of a student ('ds2d2', 'none', ...); None for the teacher
    precision: str                 # 'fp32' | 'fp16' | 'int8'
    backend: str                   # e.g. 'onnxruntime CPUExecutionProvider'
    trained: bool = True
    file: str | None = None
    file_mb: float | None = None
    params: int | None = None
    gflops: float | None = None
    mean_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput_ips: float | None = None
    infer_mean_ms: float | None = None  # the network alone (backend call), without pre/post-processing
    infer_p50_ms: float | None = None
    AP: float | None = None        # COCO metrics in [0, 1]
    AP50: float | None = None
    AP_s: float | None = None
    per_class_AP50: dict[str, float | None] = field(default_factory=dict)  # DIOR/VOC AP50 per class, [0, 1]
    ap50_delta_vs_teacher: float | None = None  # AP50 points (x100) relative to the FP32 teacher
    speedup_vs_teacher: float | None = None     # teacher FP32 mean end-to-end latency / this row's
    infer_speedup_vs_teacher: float | None = None  # the same for the network alone
    note: str = ""

    @property
    def label(self) -> str:
        """Name plus the untrained marker where it applies."""
        return self.name if self.trained else f"{self.name} ({UNTRAINED})"


@dataclass
class Context:
    """Where and how everything was measured: the same for every row of one report."""

    pipeline: str
    target: str
    date: str
    machine: dict[str, Any]
    backend: str
    input_size: int
    batch: int
    iters: int
    warmup: int
    threads: int | None
    latency_only: bool
    eval_split: str | None = None
    eval_images: int | None = None
    notes: list[str] = field(default_factory=list)

    def machine_line(self) -> str:
        """'CPU model (N cores)' (+ GPU names when present)."""
        m = self.machine
        cores = m.get("cpus_usable") or m.get("cpu_cores_logical") or "?"
        text = f"{m.get('cpu_model', 'unknown CPU')} ({cores} cores)"
        gpus = m.get("gpu")
        if isinstance(gpus, list) and gpus:
            text += " + " + ", ".join(g.get("name", "?") for g in gpus)
        return text

    def caption(self, precision: str | None = None) -> str:
        """The line every figure and table carries: machine, backend, precision, input size, date."""
        prec = f"{precision} · " if precision else ""
        threads = f", intra-op threads: {self.threads}" if self.threads else ""
        return (f"{self.machine_line()} · {self.backend}{threads} · {prec}{self.input_size}×{self.input_size} px, "
                f"batch {self.batch} · {self.date}")


@dataclass
class Results:
    """A whole report: context, rows, comparisons, figure files, and (for the demo) step times."""

    context: Context
    rows: list[Row]
    comparisons: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def row(self, role: str, precision: str, method: str | None = None) -> Row | None:
        """The first row matching role / precision (/ method for students), or None."""
        for r in self.rows:
            same_method = role == "teacher" or method is None or r.method == method
            if r.role == role and r.precision == precision and same_method:
                return r
        return None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the results.json schema)."""
        return {"context": asdict(self.context), "rows": [asdict(r) | {"label": r.label} for r in self.rows],
                "comparisons": self.comparisons, "figures": self.figures, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        """Inverse of as_dict (re-render a report from its results.json)."""
        rows = [Row(**{k: v for k, v in r.items() if k != "label"}) for r in data["rows"]]
        return cls(Context(**data["context"]), rows, data.get("comparisons", {}), data.get("figures", {}),
                   data.get("steps", []))


def story_order(rows: list[Row], method: str = "ds2d2") -> list[Row]:
    """Rows in the order the report tells them: the FP32 teacher, the INT8 student of `method` (the pair a user came
    for), then the no-KD student (INT8 before FP32), then the other INT8 rows, then everything else."""
    def rank(r: Row) -> tuple[int, int]:
        precision = {"int8": 0, "fp16": 1, "fp32": 2}.get(r.precision, 3)
        if r.role == "teacher" and r.precision == "fp32":
            return 0, 0
        if r.role == "student" and r.method == method and r.precision == "int8":
            return 1, 0
        if r.role == "student" and r.method == "none":
            return 2, precision
        return (3, 0) if r.precision == "int8" else (4, precision)

    return sorted(rows, key=rank)  # stable: measurement order breaks ties


def headline_pair(rows: list[Row], method: str = "ds2d2") -> tuple[Row, Row] | None:
    """(FP32 teacher, the student of `method` in INT8 — else its fastest precision), or None if either is missing."""
    teacher = next((r for r in rows if r.role == "teacher" and r.precision == "fp32"), None)
    students = [r for r in rows if r.role == "student" and r.method in (method, None)]
    student = next((r for r in students if r.precision == "int8"), None) or \
        min(students, key=lambda r: r.mean_ms or float("inf"), default=None)
    return (teacher, student) if teacher is not None and student is not None else None


def fill_relative(rows: list[Row]) -> None:
    """Set AP50 change and speed-up of every row relative to the FP32 teacher (when it was measured)."""
    teacher = next((r for r in rows if r.role == "teacher" and r.precision == "fp32"), None)
    if teacher is None:
        return
    for r in rows:
        if teacher.mean_ms and r.mean_ms:
            r.speedup_vs_teacher = teacher.mean_ms / r.mean_ms
        if teacher.infer_mean_ms and r.infer_mean_ms:
            r.infer_speedup_vs_teacher = teacher.infer_mean_ms / r.infer_mean_ms
        if teacher.AP50 is not None and r.AP50 is not None:
            r.ap50_delta_vs_teacher = 100.0 * (r.AP50 - teacher.AP50)


def write_text_atomic(path: Path, text: str | bytes) -> Path:
    """Atomic write of a report file (text or bytes) through runtime.atomic."""
    return write_bytes_atomic(path, text.encode() if isinstance(text, str) else text)


def write_results(results: Results, path: Path) -> Path:
    """results.json, atomically."""
    return write_text_atomic(path, json.dumps(results.as_dict(), indent=2, default=str) + "\n")

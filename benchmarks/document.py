"""Results -> the report document (tables, figures, notes), rendered to report.md and report.html by benchmarks.html."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.html import Bullets, Code, Document, Heading, Image, Para, Table
from benchmarks.results import UNTRAINED, Results, Row, headline_pair, story_order

FIGURE_TITLES = {
    "pareto": "Latency vs AP50 (Pareto front)",
    "latency": "Latency per image",
    "per_class": "Per-class AP50",
    "scene": "One test scene with detections",
}


def fmt(value: Any, spec: str = ".1f", scale: float = 1.0, suffix: str = "") -> str:
    """A number formatted, or an em dash when it was not measured."""
    if value is None:
        return "—"
    text = f"{value * scale:{spec}}"
    if text.lstrip("+-").strip("0.") == "":  # -0.0 / +0.0 from a tiny difference: show it as no difference
        text = f"{0.0:{spec}}"
    return f"{text}{suffix}"


def headline_headers() -> list[str]:
    """Columns of the main table."""
    return ["Model", "Precision", "Params (M)", "GFLOPs", "File (MB)", "Latency mean (ms)", "p50 (ms)", "p99 (ms)",
            "Throughput (img/s)", "Network only (ms)", "AP", "AP50", "AP_s", "ΔAP50 vs teacher", "Speed-up vs teacher"]


def headline_row(r: Row) -> list[str]:
    """One table line: sizes, latency, accuracy (x100) and the comparison with the FP32 teacher."""
    speed = fmt(r.speedup_vs_teacher, ".2f", suffix="x")
    if r.infer_speedup_vs_teacher is not None:
        speed += f" (network {r.infer_speedup_vs_teacher:.2f}x)"
    return [r.label, r.precision.upper(), fmt(r.params, ".2f", 1e-6), fmt(r.gflops, ".2f"), fmt(r.file_mb, ".1f"),
            fmt(r.mean_ms, ".1f"), fmt(r.p50_ms, ".1f"), fmt(r.p99_ms, ".1f"), fmt(r.throughput_ips, ".1f"),
            fmt(r.infer_mean_ms, ".1f"), fmt(r.AP, ".1f", 100), fmt(r.AP50, ".1f", 100), fmt(r.AP_s, ".1f", 100),
            fmt(r.ap50_delta_vs_teacher, "+.1f"), speed]


def headline_table(results: Results) -> Table:
    """The teacher / student / INT8 table with the context caption, in the report's story order."""
    return Table(headline_headers(), [headline_row(r) for r in story_order(results.rows)], results.context.caption())


def story(results: Results) -> str | None:
    """The sentence the report leads with: the INT8 DS2D2 student against the FP32 teacher — speed-up, AP50 kept —
    then the no-KD student of the same precision (None when the pair was not measured)."""
    pair = headline_pair(results.rows)
    if pair is None:
        return None
    teacher, student = pair
    text = f"The {student.precision.upper()} {student.name} runs {fmt(student.speedup_vs_teacher, '.1f', suffix='x')} " \
           f"faster than the FP32 teacher end to end ({fmt(student.mean_ms, '.1f')} vs {fmt(teacher.mean_ms, '.1f')} ms)"
    if teacher.AP50 and student.AP50 is not None:
        text += f" and keeps {fmt(student.AP50 / teacher.AP50, '.0f', 100, '%')} of its AP50 " \
                f"({fmt(student.AP50, '.1f', 100)} vs {fmt(teacher.AP50, '.1f', 100)})"
    none = results.row("student", student.precision, "none")
    if none is not None and none.AP50 is not None and student.AP50 is not None:
        text += f"; the same student trained without distillation reaches {fmt(none.AP50, '.1f', 100)} AP50 " \
                f"({fmt(100 * (student.AP50 - none.AP50), '+.1f')} points for DS2D2)"
    return text + "."


def kd_comparison(results: Results) -> dict[str, Any]:
    """DS2D2 vs no-KD student, per precision both were measured in: AP, AP50, AP_s and the differences (points)."""
    out: dict[str, Any] = {}
    for precision in ("fp32", "int8", "fp16"):
        ds2d2 = results.row("student", precision, "ds2d2")
        none = results.row("student", precision, "none")
        if ds2d2 is None or none is None or ds2d2.AP50 is None or none.AP50 is None:
            continue
        out[precision] = {m: {"ds2d2": getattr(ds2d2, m), "none": getattr(none, m),
                              "delta_points": None if getattr(ds2d2, m) is None or getattr(none, m) is None
                              else 100 * (getattr(ds2d2, m) - getattr(none, m))}
                          for m in ("AP", "AP50", "AP_s")}
    return out


def kd_table(results: Results) -> Table | None:
    """The DS2D2 vs no-KD table (None when the no-KD student was not measured)."""
    comp = results.comparisons.get("ds2d2_vs_none") or {}
    rows = []
    for precision, metrics in comp.items():
        for metric, v in metrics.items():
            rows.append([f"{metric} ({precision.upper()})", fmt(v["ds2d2"], ".1f", 100), fmt(v["none"], ".1f", 100),
                         fmt(v["delta_points"], "+.1f")])
    if not rows:
        return None
    return Table(["Metric", "DS2D2 student", "no-KD student", "DS2D2 − no-KD (points)"], rows,
                 f"Same student architecture, schedule and data; {results.context.eval_split} split, "
                 f"{results.context.eval_images} images. " + results.context.caption())


def build_document(results: Results, out_dir: Path, title: str | None = None) -> Document:
    """The whole report as a Document (figures referenced from `out_dir`)."""
    ctx = results.context
    doc = Document(title or f"Teacher vs student — {ctx.pipeline} on {ctx.target}")
    weights = UNTRAINED if ctx.latency_only else f"trained checkpoints; accuracy on the {ctx.eval_split} split " \
                                                 f"({ctx.eval_images} images)"
    doc.add(Para(f"Measured {ctx.date} on {ctx.machine_line()} with {ctx.backend}, input {ctx.input_size}×"
                 f"{ctx.input_size} px, batch {ctx.batch}, {ctx.iters} timed calls per model after {ctx.warmup} "
                 f"warm-up calls, all models timed side by side in interleaved rounds in one run. Weights: {weights}."))
    if ctx.latency_only:
        doc.add(Para(f"Rows marked '{UNTRAINED}' time randomly initialised networks of the pipeline's exact "
                     "architecture: their latency is real, they have no accuracy.", note=True))
    lead = story(results)
    if lead is not None:
        doc.add(Heading("Teacher FP32 vs DS2D2 student INT8"), Para(lead),
                Table(headline_headers(), [headline_row(r) for r in headline_pair(results.rows)],
                      results.context.caption()))
    doc.add(Heading("All measured models" if lead is not None else "Teacher vs student"), headline_table(results))
    kd = kd_table(results)
    if kd is not None:
        doc.add(Heading("DS2D2 vs no distillation"), kd)
    doc.add(Heading("Figures"))
    for key, name in results.figures.items():
        doc.add(Image(out_dir / name, FIGURE_TITLES.get(key, key), f"{FIGURE_TITLES.get(key, key)} — "
                                                                    f"{ctx.caption()}"))
    if results.steps:
        doc.add(Heading("Demo steps"))
        doc.add(Table(["Step", "Status", "Wall time (s)", "Command"],
                      [[s["name"], s["status"], f"{s['wall_s']:.1f}", s.get("command", "")] for s in results.steps],
                      f"Total {sum(s['wall_s'] for s in results.steps):.0f} s · {ctx.machine_line()} · {ctx.date}"))
    doc.add(Heading("How this was measured"), Bullets(method_notes(results)))
    if ctx.notes:
        doc.add(Heading("Notes"), Bullets(ctx.notes))
    doc.add(Heading("Machine"), Code(machine_text(ctx.machine)))
    return doc


def method_notes(results: Results) -> list[str]:
    """What each number means."""
    ctx = results.context
    notes = [
        "Latency: the deployed detector as an application runs it (runtime.detector): a uint8 RGB image already in "
        "memory -> resize + normalise -> network -> numpy post-processing (top-k, decoding, class-wise NMS) -> boxes "
        "in image pixels. 'Network only' is the backend call alone. Throughput = 1000 / mean latency (batch 1).",
        "All models ran in one process, in interleaved rounds on the same random image of the input size, with the "
        f"same backend and thread setting ({ctx.threads or 'all cores'} intra-op threads).",
        "Params and GFLOPs are those of the PyTorch network that was exported (backbone + FPN + head; 2 FLOPs per "
        "multiply-add, torch FlopCounterMode); INT8 files hold the same network with int8 weights and Q/DQ nodes.",
    ]
    if not ctx.latency_only:
        notes.append("AP, AP50, AP_s: COCO metrics (faster-coco-eval) on the test split through the deployed "
                     "detector (score >= manifest threshold, NMS IoU, max detections of the pipeline); per-class "
                     "AP50 is the DIOR/VOC all-point metric. ΔAP50 is in points against the FP32 teacher.")
    return notes


def machine_text(machine: dict[str, Any]) -> str:
    """The machine facts as aligned 'key: value' lines (nested dicts flattened)."""
    lines = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            lines.append(f"{prefix.rstrip('.')}: {value}")

    walk("", machine)
    return "\n".join(lines)

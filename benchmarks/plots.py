"""The report's figures (matplotlib, Agg, no pyplot state): latency vs AP50 with its Pareto front, latency bars,
per-class AP50 bars, and one scene with detections. Every figure carries the context caption (machine, backend,
precision, input size, date) and is written as PNG atomically.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are made on servers and in CI
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from benchmarks.results import Results, Row, write_text_atomic  # noqa: E402

COLORS = {"teacher": "#1f77b4", "ds2d2": "#d62728", "none": "#7f7f7f", "fitnet": "#ff7f0e", "pkd": "#9467bd"}


def _color(row: Row) -> str:
    return COLORS["teacher"] if row.role == "teacher" else COLORS.get(row.method or "", "#2ca02c")


def _save(fig: Figure, caption: str, path: Path) -> Path:
    # Reserve a strip at the bottom for the caption, so constrained layout keeps tick labels clear of it.
    strip = 0.42 / fig.get_figheight()
    fig.get_layout_engine().set(rect=(0, strip, 1, 1 - strip))
    fig.text(0.01, 0.008, caption, fontsize=7, color="#444444", ha="left", va="bottom", wrap=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return write_text_atomic(Path(path), buf.getvalue())


def _precisions(rows: Sequence[Row]) -> str:
    return "precision: " + ", ".join(dict.fromkeys(r.precision.upper() for r in rows))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x = latency, higher y = AP50), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_plot(results: Results, path: Path) -> Path | None:
    """Latency (p50) vs AP50 of every row with both; the Pareto front as a step line. None when nothing to plot."""
    rows = [r for r in results.rows if r.p50_ms is not None and r.AP50 is not None]
    if not rows:
        return None
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    pts = [(r.p50_ms, 100 * r.AP50) for r in rows]
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="#999999", lw=1, label="Pareto front")
    for i, (r, (x, y)) in enumerate(zip(rows, pts)):
        marker = "s" if r.precision == "int8" else "o"
        ax.scatter([x], [y], s=60, marker=marker, color=_color(r), zorder=3)
        # Stagger labels vertically: variants often sit on top of each other (same AP50, similar latency).
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(6, 4 - 11 * (i % 3)), fontsize=8)
    ax.set_xlabel("latency p50 per image (ms) — lower is better")
    ax.set_ylabel("AP50 (%) — higher is better")
    ax.set_title(f"{results.context.pipeline}: latency vs AP50 (○ float, □ INT8)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, results.context.caption(_precisions(rows)), path)


def latency_plot(results: Results, path: Path) -> Path | None:
    """Horizontal bars of mean latency per row with p50 and p99 ticks, speed-up vs the teacher written beside."""
    rows = [r for r in results.rows if r.mean_ms is not None]
    if not rows:
        return None
    fig = Figure(figsize=(7.5, 1.2 + 0.45 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r.mean_ms for r in rows], color=[_color(r) for r in rows],
            hatch=None, alpha=0.85, edgecolor="black", linewidth=0.5)
    ax.scatter([r.p99_ms for r in rows], y, marker="|", s=200, color="black", label="p99", zorder=3)
    ax.scatter([r.p50_ms for r in rows], y, marker="D", s=25, color="white", edgecolor="black", label="p50",
               zorder=3)
    for yi, r in zip(y, rows):
        extra = f"  {r.speedup_vs_teacher:.2f}x" if r.speedup_vs_teacher else ""
        ax.text(max(r.p99_ms or 0, r.mean_ms), yi, f" {r.mean_ms:.1f} ms{extra}", va="center", fontsize=8)
    ax.set_yticks(y, [r.label for r in rows], fontsize=8)
    ax.set_xlabel("latency per image (ms): bar = mean")
    ax.set_xlim(0, max(max(r.p99_ms or 0, r.mean_ms) for r in rows) * 1.35)
    ax.set_title(f"{results.context.pipeline}: inference latency")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, results.context.caption(_precisions(rows)), path)


def per_class_plot(results: Results, path: Path) -> Path | None:
    """Grouped bars of per-class AP50: teacher FP32, student(s) FP32, student INT8 (the rows with per-class data)."""
    rows = [r for r in results.rows if r.per_class_AP50]
    if not rows:
        return None
    classes = list(rows[0].per_class_AP50)
    fig = Figure(figsize=(max(7.5, 0.6 * len(classes) * len(rows) / 2 + 3), 4.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    x = np.arange(len(classes))
    for i, r in enumerate(rows):
        values = [100 * (r.per_class_AP50.get(c) or 0.0) for c in classes]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=r.name, color=_color(r),
               alpha=0.55 if r.precision == "int8" else 0.95, hatch="//" if r.precision == "int8" else None,
               edgecolor="black", linewidth=0.4)
    ax.set_xticks(x, classes, rotation=30 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center",
                  fontsize=8)
    ax.set_ylabel("AP50 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results.context.pipeline}: per-class AP50 ({results.context.eval_split or 'test'} split)")
    ax.legend(fontsize=8, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, results.context.caption(_precisions(rows)), path)


def scene_plot(panels: Sequence[tuple[str, np.ndarray]], caption: str, title: str, path: Path) -> Path:
    """Images (uint8 RGB, detections already drawn) side by side with their titles."""
    fig = Figure(figsize=(4.2 * len(panels), 5.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, image) in zip(axes, panels):
        ax.imshow(image)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, caption, path)

"""The end-of-run summary: one entry per stage (and student method) from each stage's metrics.json.

``<work_dir>/<pipeline>/summary.json`` = ``{"pipeline": name, "entries": [...]}``; each entry has stage, method,
AP, AP50, AP75, AP_s, AP_m, AP_l (COCO, in [0, 1], on the test split), params, gflops, wall_time_s, device,
world_size, epochs, seed, split (= scored_on: the split the metrics come from), selection (how model.pt was chosen:
"best AP50 on val" or "final epoch"), selected_on (the split that chose it, or None), config_hash, checkpoint
(model.pt path) and its sha256. The scored split never selects.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from runtime.atomic import write_json_atomic as write_json

METRIC_KEYS = ("AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l")
STAGE_ORDER = {"teacher": 0, "amplifier": 1, "student": 2}


def collect(pipeline_dir: Path) -> list[dict[str, Any]]:
    """Entries of every finished stage under ``pipeline_dir`` (teacher, amplifier, then students by method)."""
    entries = []
    for path in sorted(Path(pipeline_dir).glob("*/metrics.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        metrics, run, selection = record.get("metrics", {}), record.get("run", {}), record.get("selection") or {}
        entries.append({
            "stage": record.get("stage"), "method": record.get("method"),
            **{k: metrics.get(k) for k in METRIC_KEYS},
            "split": metrics.get("split"), "scored_on": metrics.get("split"),
            "selection": selection.get("rule"), "selected_on": selection.get("split"),
            **{k: run.get(k) for k in ("params", "gflops", "wall_time_s", "device", "world_size", "epochs", "seed")},
            "config_hash": record.get("config_hash"), "checkpoint": str(path.parent / "model.pt"),
            "sha256": (record.get("checkpoint") or {}).get("sha256"),
        })
    entries.sort(key=lambda e: (STAGE_ORDER.get(e["stage"], 9), e["method"] != "ds2d2", str(e["method"]),
                                e["seed"] if isinstance(e["seed"], int) else -1))
    return entries


def write_summary(pipeline_dir: Path, pipeline: str) -> tuple[Path, list[dict[str, Any]]]:
    """Collect the entries and write summary.json atomically beside the stage directories."""
    entries = collect(pipeline_dir)
    path = Path(pipeline_dir) / "summary.json"
    write_json(path, {"pipeline": pipeline, "entries": entries})
    return path, entries


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def _pct(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{100 * value:.1f}"


def _device(entry: dict[str, Any]) -> str:
    device, world = str(entry.get("device") or "-"), entry.get("world_size") or 1
    return f"{world} x {device}" if world > 1 else device


def summary_table(entries: list[dict[str, Any]], title: str) -> Table:
    """A rich table: AP, AP50, AP_s (percent) per stage, how model.pt was selected, parameters, GFLOPs, wall time."""
    table = Table(title=title)
    for name, justify in (("stage", "left"), ("AP", "right"), ("AP50", "right"), ("AP_s", "right"),
                          ("selected by", "left"), ("params (M)", "right"), ("GFLOPs", "right"),
                          ("wall time", "right"), ("device", "left")):
        table.add_column(name, justify=justify)
    for e in entries:
        label = f"student ({e['method']})" if e["stage"] == "student" else str(e["stage"])
        seed = e.get("seed")
        label += f" seed {seed}" if e["stage"] == "student" and seed not in (None, 0) else ""
        wall = e.get("wall_time_s")
        table.add_row(label, _pct(e["AP"]), _pct(e["AP50"]), _pct(e["AP_s"]), str(e.get("selection") or "-"),
                      "-" if e.get("params") is None else f"{e['params'] / 1e6:.2f}",
                      "-" if e.get("gflops") is None else f"{e['gflops']:.2f}",
                      _duration(wall), _device(e))
    return table


def print_summary(entries: list[dict[str, Any]], title: str, console: Console | None = None) -> None:
    """Print the summary table (COCO AP on the scored split, in percent)."""
    (console or Console()).print(summary_table(entries, title))

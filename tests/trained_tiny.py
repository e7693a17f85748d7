"""A tiny detector that has learnt something, shared by the Jetson-flow and accuracy-gate tests.

A random-weight student scores AP50 ~0 in FP32 and INT8 alike, so an accuracy gate on it cannot fail; this trains the
tiny pipeline's student (no distillation: only a detector that detects is needed) on larger synthetic objects until
its FP32 AP50 is clearly above 0. The run and the bundles built from it are cached
under the session's pytest base temp, so every module that asks gets the same ones, trained once.
"""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from conftest import tiny_config

TARGETS = {
    "jetson-orin-nx": {"description": "Jetson Orin NX, JetPack 6, DLA core 0 with GPU fallback", "runtime": "tensorrt",
                       "platform": "jetson", "precision": "int8", "workspace_mb": 2048, "dla_core": 0,
                       "trt_major": 10, "quantizer": "modelopt"},
    "cpu": {"runtime": "onnxruntime", "precision": "int8", "quantizer": "ort-u8s8"},
}
EPOCHS = 30


def trained_project(base: Path) -> tuple[Path, dict[str, Any]]:
    """(pipelines.yaml, summary entry of the trained student) under ``base``/trained-tiny, training it if needed."""
    import torch

    from distill.run import main as run_main

    root = base / "trained-tiny"
    done = root / "trained.json"
    if done.is_file():
        return root / "pipelines.yaml", json.loads(done.read_text())
    if root.exists():
        shutil.rmtree(root)  # an interrupted earlier attempt
    root.mkdir(parents=True)
    # Objects large enough for the 32-px anchors of a 64-px input, 180 small steps, the last ones at a tenth of the
    # learning rate: AP50 ~0.4 on the 8 test images (~1 min on one CPU thread), against ~0 for random weights.
    config = tiny_config(root, epochs=EPOCHS, targets=TARGETS,
                         schedule={"student": {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.05, "batch_size": 2,
                                               "warmup_iters": 5, "milestones": [EPOCHS - 5], "eval_every": EPOCHS}},
                         synthetic={"object_scale": 2.5, "num_train": 12, "num_test": 8, "objects_per_image": [1, 3]},
                         distill={"method": "none"}, deploy={"sensitivity_groups": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            run_main(["tiny", "--config", str(config), "--device", "cpu", "--stage", "student"])
    finally:
        torch.set_num_threads(threads)
    entry = json.loads((root / "runs" / "tiny" / "summary.json").read_text())["entries"][-1]
    done.write_text(json.dumps(entry))
    return config, entry


def built_bundle(base: Path, name: str, *argv: str) -> tuple[Path, int, str]:
    """(bundle directory, exit code, stderr) of ``deploy.build --config ... --model student --out ... argv``,
    built once per session for each ``name``."""
    from deploy import build
    from runtime.cli import run_cli

    config, _ = trained_project(base)
    out = config.parent / "bundles" / name
    log = config.parent / "bundles" / f"{name}.log"
    if log.is_file():
        code, err = json.loads(log.read_text())
        return out, code, err
    stderr = io.StringIO()
    code = 0
    with redirect_stdout(io.StringIO()), redirect_stderr(stderr):
        try:
            run_cli(build.main, ["--config", str(config), "--out", str(out), *argv])
        except SystemExit as exc:
            code = int(exc.code or 0)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps([code, stderr.getvalue()]))
    return out, code, stderr.getvalue()

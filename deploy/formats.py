"""The one table of artifact formats the deploy chain can produce, with what each needs (Ultralytics-style).

Every row names the file it becomes inside a bundle, the Python modules it needs (import name, pip name), and
whether it needs an NVIDIA GPU at build time. `missing(name)` answers "can this machine make it, and if not, why"
without importing the heavy packages.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from runtime.errors import UserError


@dataclass(frozen=True)
class ExportFormat:
    """One artifact kind: its name, bundle file name, requirements (import name, pip name) and GPU need."""

    name: str
    description: str
    filename: str
    requires: tuple[tuple[str, str], ...] = ()
    needs_gpu: bool = False


FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("onnx", "ONNX FP32 network: backbone + FPN + head raw outputs", "model_fp32.onnx",
                 (("onnx", "onnx"), ("onnxslim", "onnxslim"))),
    ExportFormat("onnx-fp16", "ONNX mixed FP16 (ModelOpt AutoCast), for strongly typed TensorRT 11", "model_fp16.onnx",
                 (("modelopt", "nvidia-modelopt[onnx]"),)),
    ExportFormat("onnx-int8-ort-u8s8", "ONNX INT8 Q/DQ, uint8 activations + int8 per-channel weights (ORT CPU)",
                 "model_int8.onnx", (("onnxruntime", "onnxruntime"),)),
    ExportFormat("onnx-int8-modelopt", "ONNX INT8 symmetric Q/DQ by nvidia-modelopt (TensorRT explicit quantization)",
                 "model_int8.onnx", (("modelopt", "nvidia-modelopt[onnx]"), ("onnxruntime", "onnxruntime"))),
    ExportFormat("onnx-int8-ort-symmetric", "ONNX INT8 symmetric Q/DQ by ONNX Runtime (TensorRT, modelopt fallback)",
                 "model_int8.onnx", (("onnxruntime", "onnxruntime"),)),
    ExportFormat("trt-calib-cache", "TensorRT 10 INT8 calibration cache (implicit quantization, Polygraphy)",
                 "calibration.cache", (("tensorrt", "tensorrt"),), needs_gpu=True),
    ExportFormat("engine", "TensorRT engine, built where it runs by build_engine.sh (trtexec), registered in "
                 "engine.json", "model.engine", (("tensorrt", "tensorrt"),), needs_gpu=True),
    ExportFormat("trtexec-script", "build_engine.sh / bench_engine.sh: trtexec build + registration, engine timing",
                 "build_engine.sh"),
)

# pipelines.yaml `targets.*.quantizer` -> the format it produces.
QUANTIZER_FORMATS = {"ort-u8s8": "onnx-int8-ort-u8s8", "modelopt": "onnx-int8-modelopt",
                     "ort-symmetric": "onnx-int8-ort-symmetric"}


def get_format(name: str) -> ExportFormat:
    """The format called `name`; unknown names list the known ones."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise UserError(f"unknown export format '{name}'", fix=f"choose one of: {', '.join(f.name for f in FORMATS)}")


def missing(name: str) -> list[str]:
    """pip names of the requirements of format `name` that are not installed (empty: it can be made here)."""
    # find_spec on the top-level package only: it answers without importing (modelopt pulls in torch).
    return [pip for module, pip in get_format(name).requires if importlib.util.find_spec(module) is None]


def formats_table() -> list[dict[str, str]]:
    """The table as rows (format, file, requires, GPU, available here) for printing or JSON."""
    rows = []
    for fmt in FORMATS:
        lacking = missing(fmt.name)
        rows.append({"format": fmt.name, "file": fmt.filename, "description": fmt.description,
                     "requires": ", ".join(pip for _, pip in fmt.requires) or "-",
                     "gpu": "yes" if fmt.needs_gpu else "no",
                     "available": "yes" if not lacking else f"no (missing {', '.join(lacking)})"})
    return rows


@contextlib.contextmanager
def quiet_tools() -> Iterator[None]:
    """Silence the exporters' and quantizers' prints and log records (torch, ORT, modelopt, onnxslim) for a block."""
    loggers = [logging.getLogger(), logging.getLogger("modelopt"), logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Print the format table (what each artifact needs, and whether this machine can make it)."""
    import argparse

    from rich.console import Console
    from rich.table import Table

    from runtime.cli import add_debug_flag

    parser = argparse.ArgumentParser(prog="python -m deploy.formats", description=main.__doc__)
    add_debug_flag(parser)
    parser.parse_args(argv)
    table = Table(title="deploy artifact formats")
    columns = ("format", "file", "requires", "gpu", "available")  # descriptions: formats_table() / FORMATS
    for col in columns:
        table.add_column(col)
    for row in formats_table():
        table.add_row(*(row[c] for c in columns))
    Console().print(table)
    return 0


if __name__ == "__main__":
    from runtime.cli import run_cli

    run_cli(main)

"""TEST DOUBLE support: the one "device" the stand-in trtexec, the fake ``tensorrt`` and the fake cuda-python share.

Nothing here is NVIDIA software. The doubles exist because TensorRT cannot be installed on this project's machines;
they let the tests run the bundle's real scripts (build_engine.sh, bench_engine.sh) and the runtime's real TensorRT
code path end to end. The fake device is configured by environment variables, so a test can "move" a bundle to
another GPU or TensorRT release:

- ``FAKE_GPU_NAME`` (default ``Orin``), ``FAKE_GPU_CC`` (compute capability, default ``8.7``),
  ``FAKE_NO_GPU=1`` (no CUDA device answers),
- ``FAKE_TRT_VERSION`` (default ``10.3.0.30``), the TensorRT release of both trtexec and ``tensorrt``.

A fake engine ("plan") is ``MAGIC``, one JSON header line (what it was built for and how), then the ONNX bytes it was
"built" from; the fake ``tensorrt`` runs those bytes with ONNX Runtime on the CPU.
"""
from __future__ import annotations

import json
import os
from typing import Any

MAGIC = b"FAKE-TENSORRT-PLAN (test double, not a TensorRT engine)\n"


def gpu() -> tuple[str, str] | None:
    """(name, compute capability) of the fake CUDA device 0, or None when FAKE_NO_GPU is set."""
    if os.environ.get("FAKE_NO_GPU"):
        return None
    return os.environ.get("FAKE_GPU_NAME", "Orin"), os.environ.get("FAKE_GPU_CC", "8.7")


def trt_version() -> str:
    """The fake TensorRT release, 'major.minor.patch.build'."""
    return os.environ.get("FAKE_TRT_VERSION", "10.3.0.30")


def version_tuple(text: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30)."""
    return tuple(int(p) for p in text.split("."))


def write_plan(path: str, header: dict[str, Any], onnx_bytes: bytes) -> None:
    """Write a fake plan file."""
    with open(path, "wb") as f:
        f.write(MAGIC + json.dumps(header).encode() + b"\n" + onnx_bytes)


def read_plan(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header, onnx bytes) of a fake plan, or None when the bytes are not one."""
    if not data.startswith(MAGIC):
        return None
    head, _, onnx_bytes = data[len(MAGIC):].partition(b"\n")
    return json.loads(head), onnx_bytes


def refusal(header: dict[str, Any], host_code_allowed: bool) -> str | None:
    """Why real TensorRT would refuse to deserialize this plan on the fake device (None: it loads).

    Mirrors TensorRT's documented rules: the exact version unless built version-compatible (then same major and not
    older, and the runtime must allow host code); the same GPU model unless built hardware-compatible.
    """
    here, built = version_tuple(trt_version()), version_tuple(header["trt_version"])
    if header.get("version_compatible"):
        if here[0] != built[0] or here < built:
            return f"version-compatible plan from TensorRT {header['trt_version']} cannot run on {trt_version()}"
        if not host_code_allowed:
            return "plan contains host code: set IRuntime.engine_host_code_allowed"
    elif here != built:
        return (f"The engine plan file is not compatible with this version of TensorRT, expecting library version "
                f"{trt_version()} got {header['trt_version']}, please rebuild.")
    device = gpu()
    if device is None:
        return "no CUDA device"
    level = header.get("hardware_compatibility", "none")
    if level == "ampere+":
        if int(device[1].split(".")[0]) < 8:
            return "ampere+ plan on a pre-Ampere GPU"
    elif device[1] != header["compute_capability"] or (level == "none" and device[0] != header["gpu_name"]):
        return (f"plan built for {header['gpu_name']} (compute capability {header['compute_capability']}) cannot run "
                f"on {device[0]} ({device[1]})")
    return None

"""Facts about the machine a measurement ran on: CPU, cores, library versions, GPU, and on a Jetson its JetPack /
L4T release, power mode, clock state and power draw.

Every fact comes from the system (files, ``psutil``, package metadata, ``nvidia-smi``, ``nvpmodel``, ``tegrastats``);
whatever cannot be read is the string ``"unavailable"``, never a guess.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import psutil

UNAVAILABLE = "unavailable"
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def package_version(name: str) -> str:
    """Installed version of a distribution (without importing it), or "unavailable"."""
    for dist in (name, name.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return UNAVAILABLE


def _first_installed(*names: str) -> str:
    """Version of the first of several alternative distributions that is installed."""
    return next((v for v in map(package_version, names) if v != UNAVAILABLE), UNAVAILABLE)


def tensorrt_version() -> str:
    """TensorRT's version: JetPack installs it as a system module without pip metadata, so fall back to importing."""
    version = _first_installed("tensorrt", "tensorrt-cu12", "tensorrt-lean")
    if version != UNAVAILABLE:
        return version
    try:
        import tensorrt  # noqa: PLC0415 - optional, only to read the version

        return str(tensorrt.__version__)
    except Exception:  # ImportError, or a broken install raising anything else
        return UNAVAILABLE


def cpu_model() -> str:
    """The CPU's model name (x86 'model name'; ARM via lscpu), or "unavailable"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    out = _run(["lscpu"])
    if out:
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or UNAVAILABLE


def onnxruntime_providers() -> list[str] | str:
    """Execution providers the installed onnxruntime offers."""
    try:
        import onnxruntime  # noqa: PLC0415

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return UNAVAILABLE


def gpu_info() -> list[dict[str, str]] | str:
    """Name, driver and memory of each NVIDIA GPU from nvidia-smi, or "unavailable"."""
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if not out:
        return UNAVAILABLE
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory_total": parts[2]})
    return gpus or UNAVAILABLE


def gpu_memory_used_mib(pid: int | None = None) -> float | str:
    """GPU memory held by this process (MiB) according to nvidia-smi, or "unavailable" (no GPU, or a Jetson)."""
    out = _run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    if out is None:
        return UNAVAILABLE
    pid = os.getpid() if pid is None else pid
    used = [float(m) for p, m in (line.split(",")[:2] for line in out.strip().splitlines() if "," in line)
            if p.strip() == str(pid) and m.strip().replace(".", "", 1).isdigit()]
    return sum(used) if used else UNAVAILABLE


# -- Jetson ------------------------------------------------------------------------------------------------------

def l4t_release(path: Path = TEGRA_RELEASE) -> str:
    """L4T release like 'R36.3.0' from /etc/nv_tegra_release, or "unavailable"."""
    try:
        text = path.read_text()
    except OSError:
        return UNAVAILABLE
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{match.group(1)}.{match.group(2)}" if match else UNAVAILABLE


def jetpack_version() -> str:
    """JetPack version from the nvidia-jetpack package, or "unavailable"."""
    out = _run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"])
    return out.strip() if out and out.strip() else UNAVAILABLE


def nvpmodel_mode() -> str:
    """Power mode from ``nvpmodel -q`` (e.g. 'MAXN (mode 0)'), or "unavailable"."""
    out = _run(["nvpmodel", "-q"])
    if not out:
        return UNAVAILABLE
    match = re.search(r"NV Power Mode:\s*(\S+)", out)
    number = next((ln.strip() for ln in out.splitlines() if ln.strip().isdigit()), None)
    if not match:
        return UNAVAILABLE
    return f"{match.group(1)} (mode {number})" if number is not None else match.group(1)


def jetson_clocks_state() -> str:
    """'on' when ``jetson_clocks --show`` reports every CPU's minimum clock at its maximum, else 'off'."""
    out = _run(["jetson_clocks", "--show"])
    if not out:
        return UNAVAILABLE
    cpus = re.findall(r"cpu\d+:.*?MinFreq=(\d+)\s+MaxFreq=(\d+)", out)
    if not cpus:
        return UNAVAILABLE
    return "on" if all(lo == hi for lo, hi in cpus) else "off"


def device_model() -> str:
    """Board name from the device tree (Jetsons and other ARM boards), or "unavailable"."""
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    except OSError:
        return UNAVAILABLE


def parse_tegrastats_power(line: str) -> dict[str, float]:
    """Instant power per rail in mW from one tegrastats line ('VDD_IN 5012mW/4980mW' or 'POM_5V_IN 2345/2300')."""
    rail = r"\b([A-Z][A-Z0-9_]+) (\d+)(?:mW)?/\d+(?:mW)?(?=\s|$)"  # the lookahead skips 'RAM 2000/7000MB'
    return {name: float(now) for name, now in re.findall(rail, line)}


class TegrastatsSampler:
    """Runs ``tegrastats`` while a measurement runs and averages the power of each rail; inert off a Jetson."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._samples: list[dict[str, float]] = []

    def __enter__(self) -> TegrastatsSampler:
        if shutil.which("tegrastats"):
            try:
                self._proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)],
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                self._proc = None
        if self._proc is not None:
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            rails = parse_tegrastats_power(line)
            if rails:
                self._samples.append(rails)

    def __exit__(self, *exc_info: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def summary(self) -> dict[str, Any] | str:
        """Mean mW per rail and the sample count, or "unavailable" when nothing was sampled."""
        if not self._samples:
            return UNAVAILABLE
        rails = sorted({k for s in self._samples for k in s})
        mean = {r: round(sum(s.get(r, 0.0) for s in self._samples) / len(self._samples), 1) for r in rails}
        total = next((mean[r] for r in ("VDD_IN", "POM_5V_IN") if r in mean), UNAVAILABLE)
        return {"mean_mw": mean, "total_input_mw": total, "samples": len(self._samples)}


def machine_facts() -> dict[str, Any]:
    """Everything known about this machine and the inference libraries, JSON-ready."""
    is_jetson = TEGRA_RELEASE.exists()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else UNAVAILABLE
    return {
        "hostname": platform.node() or UNAVAILABLE,
        "os": platform.platform(),
        "arch": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_cores_physical": psutil.cpu_count(logical=False) or UNAVAILABLE,
        "cpu_cores_logical": psutil.cpu_count(logical=True) or UNAVAILABLE,
        "cpus_usable": affinity,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", UNAVAILABLE),
        "memory_total_mib": round(psutil.virtual_memory().total / 2**20),
        "versions": {
            "python": platform.python_version(),
            "numpy": package_version("numpy"),
            "onnxruntime": _first_installed("onnxruntime", "onnxruntime-gpu"),
            "opencv": _first_installed("opencv-python-headless", "opencv-python"),
            "polygraphy": package_version("polygraphy"),
            "tensorrt": tensorrt_version(),
        },
        "onnxruntime_providers": onnxruntime_providers(),
        "gpu": gpu_info(),
        "jetson": {
            "device_model": device_model() if is_jetson else UNAVAILABLE,
            "l4t": l4t_release(),
            "jetpack": jetpack_version() if is_jetson else UNAVAILABLE,
            "nvpmodel": nvpmodel_mode(),
            "jetson_clocks": jetson_clocks_state(),
        },
    }

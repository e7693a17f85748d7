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

# JetPack release of each L4T release (NVIDIA's JetPack archive), for devices without the nvidia-jetpack package.
L4T_JETPACK = {"R35.2.1": "5.1", "R35.3.1": "5.1.1", "R35.4.1": "5.1.2", "R35.5.0": "5.1.3", "R35.6.0": "5.1.4",
               "R36.3.0": "6.0", "R36.4.0": "6.1", "R36.4.3": "6.2"}
THERMAL_ROOT = Path("/sys/class/thermal")
DEVFREQ_ROOT = Path("/sys/class/devfreq")


def is_jetson() -> bool:
    """True on an L4T system (the release file JetPack installs exists)."""
    return TEGRA_RELEASE.exists()


def l4t_release(path: Path | None = None) -> str:
    """L4T release like 'R36.3.0' from /etc/nv_tegra_release, or "unavailable"."""
    try:
        text = (path or TEGRA_RELEASE).read_text()
    except OSError:
        return UNAVAILABLE
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{match.group(1)}.{match.group(2)}" if match else UNAVAILABLE


def jetpack_version() -> str:
    """JetPack version from the nvidia-jetpack package, else from the L4T release (said so), else "unavailable"."""
    out = _run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"])
    if out and out.strip():
        return out.strip()
    l4t = l4t_release()
    return f"{L4T_JETPACK[l4t]} (from L4T {l4t})" if l4t in L4T_JETPACK else UNAVAILABLE


def nvpmodel_mode(out: str | None = None) -> str:
    """Power mode from ``nvpmodel -q`` (run now, or its captured ``out``), e.g. 'MAXN (mode 0)', or "unavailable"."""
    out = _run(["nvpmodel", "-q"]) if out is None else out
    if not out:
        return UNAVAILABLE
    match = re.search(r"NV Power Mode:\s*(\S+)", out)
    number = next((ln.strip() for ln in out.splitlines() if ln.strip().isdigit()), None)
    if not match:
        return UNAVAILABLE
    return f"{match.group(1)} (mode {number})" if number is not None else match.group(1)


_CLOCK = r"MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)"


def jetson_clocks_show(out: str | None = None) -> dict[str, Any] | str:
    """``jetson_clocks --show`` (run now, needs root; or its captured ``out``): state 'on' when every CPU and the GPU
    run at a fixed clock (MinFreq = MaxFreq, what ``jetson_clocks`` sets), GPU and EMC clocks in MHz; "unavailable"
    when unreadable."""
    out = _run(["jetson_clocks", "--show"]) if out is None else out
    if not out:
        return UNAVAILABLE
    cpus = re.findall(rf"cpu\d+:.*?{_CLOCK}", out)
    gpu = re.search(rf"(?:^|\n)\s*(?:GPU|gpu-gpc-\d+) {_CLOCK}", out)
    emc = re.search(rf"EMC {_CLOCK}", out)
    if not cpus and not gpu:
        return UNAVAILABLE
    locked = [lo == hi for lo, hi, _ in cpus] + ([gpu.group(1) == gpu.group(2)] if gpu else [])

    def mhz(match: re.Match[str]) -> dict[str, float]:
        return {k: int(match.group(i)) / 1e6 for i, k in enumerate(("min", "max", "current"), start=1)}

    return {"state": "on" if all(locked) else "off", "gpu_mhz": mhz(gpu) if gpu else UNAVAILABLE,
            "emc_mhz": mhz(emc) if emc else UNAVAILABLE}


def jetson_clocks_state() -> str:
    """'on' / 'off' from ``jetson_clocks --show`` (see :func:`jetson_clocks_show`), or "unavailable"."""
    shown = jetson_clocks_show()
    return shown["state"] if isinstance(shown, dict) else UNAVAILABLE


def gpu_clock_mhz() -> float | str:
    """Current GPU clock from devfreq (no root needed; Jetson GPUs are devfreq devices), or "unavailable"."""
    for node in sorted(DEVFREQ_ROOT.glob("*")):
        if "gpu" in node.name or "ga10b" in node.name or "gv11b" in node.name:
            try:
                return int((node / "cur_freq").read_text().strip()) / 1e6
            except (OSError, ValueError):
                continue
    return UNAVAILABLE


def thermal_zones() -> dict[str, float] | str:
    """Temperature per thermal zone in deg C (sysfs, millidegrees), or "unavailable"."""
    temps = {}
    for zone in sorted(THERMAL_ROOT.glob("thermal_zone*")):
        try:
            temps[(zone / "type").read_text().strip()] = int((zone / "temp").read_text().strip()) / 1000
        except (OSError, ValueError):
            continue
    return temps or UNAVAILABLE


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


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One tegrastats line: power per rail (mW), GPU (GR3D) and EMC load % and clock MHz, temperatures (deg C).

    Orin prints 'EMC_FREQ 3%@2133 GR3D_FREQ 0%@[305]' (one clock per GPC in brackets), older Jetsons
    'GR3D_FREQ 0%@76'; temperatures as 'tj@47.5C'. Fields a line lacks are absent.
    """
    found: dict[str, Any] = {"power_mw": parse_tegrastats_power(line)}
    for key, name in (("gpu", "GR3D_FREQ"), ("emc", "EMC_FREQ")):
        match = re.search(rf"\b{name} (\d+)%(?:@\[?(\d+)(?:,\d+)*\]?)?", line)
        if match:
            found[f"{key}_load_pct"] = float(match.group(1))
            if match.group(2):
                found[f"{key}_mhz"] = float(match.group(2))
    temps = {name: float(value) for name, value in re.findall(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b", line)}
    if temps:
        found["temperature_c"] = temps
    return found


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(sum(values) / len(values), 1), "min": min(values), "max": max(values)}


def summarize_tegrastats(lines: Any, interval_ms: int | None = None) -> dict[str, Any] | str:
    """Mean mW per rail, GPU/EMC clock and load (mean/min/max), hottest reading per sensor and the sample count of
    tegrastats output lines; "unavailable" when none parses."""
    samples = [s for s in map(parse_tegrastats, lines) if s["power_mw"] or len(s) > 1]
    if not samples:
        return UNAVAILABLE
    powers = [s["power_mw"] for s in samples if s["power_mw"]]
    rails = sorted({k for p in powers for k in p})
    mean = {r: round(sum(p.get(r, 0.0) for p in powers) / len(powers), 1) for r in rails}
    out: dict[str, Any] = {
        "mean_mw": mean, "total_input_mw": next((mean[r] for r in ("VDD_IN", "POM_5V_IN") if r in mean), UNAVAILABLE),
        "samples": len(samples), "interval_ms": interval_ms if interval_ms is not None else UNAVAILABLE}
    for key in ("gpu_mhz", "gpu_load_pct", "emc_mhz", "emc_load_pct"):
        values = [s[key] for s in samples if key in s]
        out[key] = _spread(values) if values else UNAVAILABLE
    sensors = sorted({k for s in samples for k in s.get("temperature_c", {})})
    out["temperature_max_c"] = {k: max(s["temperature_c"][k] for s in samples if k in s.get("temperature_c", {}))
                                for k in sensors} or UNAVAILABLE
    return out


class TegrastatsSampler:
    """Runs ``tegrastats`` while a measurement runs: power per rail, GPU/EMC clocks and load, temperatures; inert
    off a Jetson."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._lines: list[str] = []

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
            self._lines.append(line)

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
        """:func:`summarize_tegrastats` of what was sampled ("unavailable" off a Jetson)."""
        return summarize_tegrastats(self._lines, self.interval_ms)


def machine_facts() -> dict[str, Any]:
    """Everything known about this machine and the inference libraries, JSON-ready."""
    jetson = is_jetson()
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
        "jetson": jetson_facts() if jetson else dict.fromkeys(JETSON_FACTS, UNAVAILABLE),
    }


JETSON_FACTS = ("device_model", "l4t", "jetpack", "nvpmodel", "jetson_clocks", "gpu_mhz", "emc_mhz", "temperature_c")


def jetson_facts() -> dict[str, Any]:
    """JetPack / L4T, power mode, clock state and clocks, temperatures of this Jetson, read now."""
    clocks = jetson_clocks_show()
    shown = clocks if isinstance(clocks, dict) else {}
    return {
        "device_model": device_model(),
        "l4t": l4t_release(),
        "jetpack": jetpack_version(),
        "nvpmodel": nvpmodel_mode(),
        "jetson_clocks": shown.get("state", UNAVAILABLE),
        # jetson_clocks --show needs root; devfreq gives the GPU's current clock without it
        "gpu_mhz": shown["gpu_mhz"] if shown.get("gpu_mhz", UNAVAILABLE) != UNAVAILABLE else gpu_clock_mhz(),
        "emc_mhz": shown.get("emc_mhz", UNAVAILABLE),
        "temperature_c": thermal_zones(),
    }

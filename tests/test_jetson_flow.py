"""The README's Jetson flow, end to end, on a trained tiny detector, with labelled test doubles for what a Jetson has.

Real here: deploy.build, the bundle's own build_engine.sh / bench_engine.sh / engine_record.py (run by a Python 3.10,
JetPack 6's python3, when this machine has one), runtime.bench, deploy.verify, the runtime's TensorRT runner code.
Doubled (tests/doubles, each file says what it mimics): trtexec (bin/trtexec), TensorRT's Python bindings
(python/tensorrt), cuda-python (python/cuda), nvpmodel / jetson_clocks / tegrastats / dpkg-query (bin/), and the
device, an "Orin" with compute capability 8.7 and TensorRT 10.3.0.30 (FAKE_* variables move the bundle to another
one). No step of this ran against real TensorRT: none can be installed on this project's machines.

The test fails if build_engine.sh stops registering the engine (runtime.bench would not report tensorrt), if auto
selection stops choosing a registered engine, or if the compatibility and integrity checks go (another TensorRT
release or GPU, or a tampered engine, would then be run instead of refused with a line naming both sides).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trained_tiny import built_bundle, trained_project

from runtime.engine_record import file_sha256
from runtime.manifest import load_bundle

REPO = Path(__file__).resolve().parent.parent
DOUBLES = Path(__file__).resolve().parent / "doubles"
# Training the tiny detector takes ~1 min alone, several on a loaded machine: more than the default 600 s timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@functools.cache
def jetpack_python() -> str:
    """A Python 3.10 (JetPack 6's python3, which runs the bundle's engine_record.py) if this machine has one that
    works, else this interpreter."""
    candidates = [shutil.which("python3.10"), *sorted(map(str, Path.home().glob(".pyenv/versions/3.10*/bin/python3")))]
    for candidate in filter(None, candidates):
        done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                              capture_output=True, text=True, check=False)
        if done.stdout.strip() == "True":
            return candidate
    return sys.executable



def device_env(**fake: str) -> dict[str, str]:
    """The environment of a shell on the doubled Jetson: stand-in tools first on PATH, the fakes importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    env.update(PATH=f"{DOUBLES / 'bin'}:{env['PATH']}", PYTHONPATH=f"{DOUBLES / 'python'}:{REPO}",
               PYTHON=jetpack_python(), CUDA_VISIBLE_DEVICES="", COLUMNS="200", **fake)
    return env


def on_device(cwd: Path, *cmd: str, **fake: str) -> subprocess.CompletedProcess:
    """Run a command as the README runs it on the device (cwd: the user's home, holding the copied bundle)."""
    return subprocess.run(list(cmd), cwd=cwd, env=device_env(**fake), capture_output=True, text=True, timeout=600)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """deploy.build --target jetson-orin-nx on the host, then the bundle copied to the 'device' (a fresh dir)."""
    bundle, code, err = built_bundle(tmp_path_factory.getbasetemp(), "orin-nx", "--target", "jetson-orin-nx")
    assert code == 0, err
    home = tmp_path_factory.mktemp("jetson-home")
    shutil.copytree(bundle, home / "bundle")  # scp -r artifacts/<pipeline>/jetson-orin-nx jetson:~/bundle
    return home


def test_host_writes_the_flow_the_device_runs(device):
    bundle = device / "bundle"
    m = load_bundle(bundle).manifest
    assert {"build-script", "bench-script", "engine-tool"} <= {e.role for e in m.files.values()}
    assert (bundle / "engine_record.py").read_text() == (REPO / "runtime" / "engine_record.py").read_text()
    assert not (bundle / "engine.json").exists() and not (bundle / "model.engine").exists()  # not built here
    readme = (bundle / "README.md").read_text()
    for step in ("./build_engine.sh", "python -m runtime.bench", "./bench_engine.sh",
                 "python -m deploy.verify <this directory> --dataset DIR --backend trt", "engine.json"):
        assert step in readme
    gate = json.loads((bundle / "accuracy_gate.json").read_text())
    assert gate["fp32"]["AP50"] > 0 and len(gate["images"]) == 8 and gate["split"] == "test"


def test_device_builds_registers_runs_times_and_gates_the_engine(device):
    built = on_device(device, "./bundle/build_engine.sh")
    assert built.returncode == 0, built.stderr + built.stdout
    record = json.loads((device / "bundle" / "engine.json").read_text())
    assert record["engine"]["sha256"] == file_sha256(device / "bundle" / "model.engine")
    assert (record["tensorrt_version"], record["gpu_name"], record["compute_capability"]) == ("10.3.0.30", "Orin",
                                                                                             "8.7")
    assert record["dla_core"] == 0 and record["precision"] == "int8" and "--int8" in record["build_command"]
    assert record["version_compatible"] is False and record["hardware_compatibility"] == "none"
    # the shipped files keep their manifest hashes: the bundle still verifies
    assert load_bundle(device / "bundle").engine.engine.file == "model.engine"

    bench = on_device(device, *python("-m", "runtime.bench", "bundle", "--iters", "3", "--warmup", "1",
                                      "--json", "bench.json"))
    assert bench.returncode == 0, bench.stderr
    report = json.loads((device / "bench.json").read_text())
    assert report["detector"]["backend"] == "trt" and report["detector"]["runner"]["name"] == "tensorrt"
    assert report["detector"]["runner"]["gpu"] == "Orin" and "warning" not in bench.stderr
    assert report["results"]["power"]["total_input_mw"] == 7012.0  # tegrastats beside the figures

    timed = on_device(device, "./bundle/bench_engine.sh")
    assert timed.returncode == 0, timed.stderr + timed.stdout
    bench = on_device(device, *python("-m", "runtime.bench", "bundle", "--iters", "3", "--warmup", "1",
                                      "--json", "bench.json"))
    report = json.loads((device / "bench.json").read_text())
    engine_only = report["engine_only"]
    assert engine_only["engine_sha256"] == record["engine"]["sha256"] and engine_only["inferences"] == 50
    conditions = engine_only["conditions"]  # the device's state while trtexec timed the engine
    assert conditions["nvpmodel"] == "15W (mode 0)" and conditions["jetson_clocks"] == "on"
    assert "engine only: GPU compute (trtexec)" in bench.stdout and "device then:" in bench.stdout

    verify = on_device(device, *python("-m", "deploy.verify", "bundle", "--dataset", str(dataset(device)),
                                       "--backend", "trt", "--quiet", "--json", "gate.json"))
    assert verify.returncode == 0, verify.stderr
    gate = json.loads((device / "gate.json").read_text())
    host = json.loads((device / "bundle" / "accuracy_gate.json").read_text())
    assert gate["detector"]["backend"] == "trt" and gate["passed"] and gate["dataset"]["images"] == 8
    # the fake engine runs the INT8 Q/DQ model, so the device's AP50 is the host's INT8 AP50 under the same metrics
    assert gate["ap50"] == pytest.approx(host["int8"]["AP50"]) and gate["fp32_ap50_at_build"] == host["fp32"]["AP50"]
    strict = on_device(device, *python("-m", "deploy.verify", "bundle", "--dataset", str(dataset(device)),
                                       "--backend", "trt", "--quiet", "--json", "gate.json",
                                       "--ap50-drop-limit", "-100"))
    assert strict.returncode == 2 and "below the FP32 AP50 recorded at build time" in strict.stderr


def dataset(device: Path) -> Path:
    """The test split the bundle was gated on, as the user copies it to the device."""
    config, _ = trained_project(device.parent)
    return config.parent / "data" / "tiny"


@pytest.mark.parametrize("fake", [{"FAKE_TRT_VERSION": "10.3.0.31"}, {"FAKE_GPU_CC": "8.6"},
                                  {"FAKE_GPU_NAME": "NVIDIA Jetson AGX Orin"}])
def test_an_engine_built_elsewhere_is_refused_and_auto_falls_back(device, fake):
    if not (device / "bundle" / "engine.json").exists():
        assert on_device(device, "./bundle/build_engine.sh").returncode == 0
    here = {"FAKE_TRT_VERSION": "10.3.0.30", "FAKE_GPU_NAME": "Orin", "FAKE_GPU_CC": "8.7", **fake}
    here_line = f"TensorRT {here['FAKE_TRT_VERSION']} on {here['FAKE_GPU_NAME']} (compute capability " \
                f"{here['FAKE_GPU_CC']})"
    forced = on_device(device, *python("-m", "runtime.bench", "bundle", "--backend", "trt", "--iters", "1",
                                       "--warmup", "0", "--json", "refused.json"), **fake)
    assert forced.returncode == 2
    line = forced.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model.engine: engine built with TensorRT 10.3.0.30 on Orin (compute capability "
                           "8.7), this machine has " + here_line) and "build_engine.sh" in line
    auto = on_device(device, *python("-m", "runtime.bench", "bundle", "--iters", "1", "--warmup", "0",
                                     "--json", "fallback.json"), **fake)
    assert auto.returncode == 0, auto.stderr
    assert json.loads((device / "fallback.json").read_text())["detector"]["backend"] == "ort-cpu"
    assert "warning: TensorRT engine not used: engine built with TensorRT 10.3.0.30 on Orin" in auto.stderr
    assert here_line in auto.stderr


def test_a_tampered_engine_is_refused(device, tmp_path):
    if not (device / "bundle" / "engine.json").exists():
        assert on_device(device, "./bundle/build_engine.sh").returncode == 0
    copy = tmp_path / "bundle"
    shutil.copytree(device / "bundle", copy)
    data = bytearray((copy / "model.engine").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the plan (its weights)
    (copy / "model.engine").write_bytes(bytes(data))
    for backend in ("trt", "auto"):
        run = on_device(tmp_path, *python("-m", "runtime.bench", "bundle", "--backend", backend, "--iters", "1",
                                          "--warmup", "0", "--json", "tampered.json"))
        assert run.returncode == 2
        assert "model.engine: engine does not match the sha256 registered in engine.json" in run.stderr


def test_engine_is_built_on_the_host_only_when_asked_or_when_it_is_the_target(tmp_path_factory, monkeypatch):
    """--engine build runs the bundle's own build_engine.sh here (the doubled trtexec); without it, this host (not a
    Jetson) only ships the script."""
    monkeypatch.setenv("PATH", device_env()["PATH"])
    monkeypatch.setenv("PYTHONPATH", device_env()["PYTHONPATH"])
    monkeypatch.setenv("PYTHON", jetpack_python())
    base = tmp_path_factory.getbasetemp()
    bundle, code, err = built_bundle(base, "orin-nx-host-engine", "--target", "jetson-orin-nx", "--precision", "fp16",
                                     "--engine", "build")
    assert code == 0, err
    assert "engine built and registered on this host" in err
    loaded = load_bundle(bundle)
    assert loaded.engine is not None and loaded.engine.precision == "fp16" and "--fp16" in loaded.engine.build_command
    assert "model.engine" not in loaded.manifest.files  # registered in engine.json, verified on its own

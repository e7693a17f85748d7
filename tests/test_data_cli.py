"""`python -m runtime.data` as a user runs it: stats (--json, --strict), synth, split-dota, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import DOTA_SAMPLES, make_dota, simple_dior

from runtime.data.synthetic import SyntheticParams, generate

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.data", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not DOTA_SAMPLES.is_dir(), reason="DOTA samples not on this machine")
def test_stats_json_on_real_dota_samples():
    proc = run("stats", str(DOTA_SAMPLES), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert out["images"] == 2 and out["objects"] == 600 and out["difficult"] == 6
    assert out["per_class"]["ship"] == 531 and out["per_class"]["harbor"] == 5
    assert out["per_class"]["large-vehicle"] == 50 and out["per_class"]["small-vehicle"] == 14
    per_image = {p["image"]: p for p in out["per_image"]}
    assert per_image["P1888"]["objects"] == 64 and per_image["P1888"]["per_class"] == {"large-vehicle": 50,
                                                                                         "small-vehicle": 14}
    assert per_image["P0706"]["objects"] == 536 and per_image["P0706"]["difficult"] == 6
    assert 0 < out["small"] < out["objects"]
    assert out["problems"]["notes"] == {"clipped-box": 1}


def test_stats_table_and_problem_summary(tmp_path):
    root = simple_dior(tmp_path / "DIOR")
    (root / "JPEGImages-trainval" / "00002.jpg").write_bytes(b"garbage")
    proc = run("stats", str(root), "--split", "trainval")
    assert proc.returncode == 0, proc.stderr
    assert "vehicle" in proc.stdout and "airplane" in proc.stdout
    assert "corrupt-image: 1 (image skipped)" in proc.stderr and "00002.jpg" in proc.stderr
    strict = run("stats", str(root), "--split", "trainval", "--strict")
    assert strict.returncode == 2 and strict.stderr.count("\n") == 1  # one line, no traceback
    assert "00002.jpg" in strict.stderr and "corrupt-image" in strict.stderr


def test_stats_errors_are_one_line(tmp_path):
    proc = run("stats", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data/DIOR" in proc.stderr and "make demo" in proc.stderr
    make_dota(tmp_path / "dota", {"P1": "1 2 3 plane\n"})
    proc = run("stats", str(tmp_path / "dota"), "--format", "dota", "--strict")
    assert proc.returncode == 2 and "P1.txt:1" in proc.stderr


def test_synth_cli_matches_the_library_byte_for_byte(tmp_path):
    proc = run("synth", str(tmp_path / "cli"), "--seed", "5", "--image-size", "96", "--num-train", "3",
               "--num-val", "1", "--num-test", "2", "--set", "objects_per_image=[2,8]", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] is True
    params = SyntheticParams(seed=5, image_size=96, num_train=3, num_val=1, num_test=2, objects_per_image=(2, 8))
    generate(params, tmp_path / "lib")
    cli_manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert cli_manifest == json.loads((tmp_path / "lib" / "manifest.json").read_text())  # same hashes, other process
    again = run("synth", str(tmp_path / "cli"), "--seed", "5", "--image-size", "96", "--num-train", "3",
                "--num-val", "1", "--num-test", "2", "--set", "objects_per_image=[2,8]")
    assert again.returncode == 0 and "nothing written" in again.stdout
    bad = run("synth", str(tmp_path / "x"), "--classes", "vehicle,dragon")
    assert bad.returncode == 2 and "classes" in bad.stderr and "Traceback" not in bad.stderr


def test_split_dota_cli(tmp_path):
    make_dota(tmp_path / "src" / "train", {"P1": "10 10 20 10 20 20 10 20 plane 0\n"}, size=(300, 200))
    proc = run("split-dota", str(tmp_path / "src"), str(tmp_path / "dst"), "--patch", "128", "--overlap", "32")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "dst" / "train" / "labelTxt").iterdir())
    assert names[0] == "P1__128__0___0.txt" and len(names) == 6

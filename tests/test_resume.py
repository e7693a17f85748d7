"""Exact resume: a run SIGKILLed mid-epoch and resumed with --resume ends with the weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from distill.data import ensure_dataset
from runtime.config import load_config

REPO = Path(__file__).resolve().parent.parent

# Runs `python -m distill.run ARGS` but, when last.pt is about to be written for (epoch, iteration) == PAUSE, first
# touches MARKER and sleeps: the test then SIGKILLs a process that has logged a step past its last checkpoint.
DRIVER = """
import sys, time, pathlib
import distill.trainer as trainer
marker, pause, args = pathlib.Path(sys.argv[1]), (int(sys.argv[2]), int(sys.argv[3])), sys.argv[4:]
real_save = trainer.save_checkpoint
def save(path, payload):
    state = payload.get("resume", {}).get("state")
    if state is not None and (state["epoch"], state["iteration"]) == pause:
        marker.write_text("about to checkpoint")
        time.sleep(600)
    return real_save(path, payload)
trainer.save_checkpoint = save
from distill.run import main
from runtime.cli import run_cli
run_cli(main, args)
"""


def _launch(cfg: Path, work: Path, marker: Path, pause: tuple[int, int], *extra: str) -> subprocess.Popen:
    """`distill.run tiny --stage teacher` in a subprocess that pauses (for the kill) before checkpointing PAUSE."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["tiny", "--config", str(cfg), "--stage", "teacher", "--device", "cpu", "--work-dir", str(work), *extra]
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(marker), *map(str, pause), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_log(stage_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "train"]


@pytest.mark.parametrize("arch", ["retinanet", pytest.param("faster_rcnn", marks=pytest.mark.slow)])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, arch):
    # 12 images / batch 2 = 6 steps per epoch, last.pt every step; lr drops after epoch 1 (scheduler state matters).
    # Faster R-CNN also draws its RPN and RoI samples from the global RNG: its state must come back exactly too.
    cfg = tiny_config(tmp_path, arch=arch, epochs=2,
                      schedule={"teacher": {"batch_size": 2, "milestones": [1], "warmup_iters": 3}})
    pipe = load_config(cfg).pipeline("tiny")
    ensure_dataset(pipe.dataset_root, pipe.dataset.synthetic)  # before two processes start at once
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    reference = _launch(cfg, straight, tmp_path / "never", (-1, -1))
    victim = _launch(cfg, killed, marker := tmp_path / "paused", (1, 4))  # 2nd epoch, before checkpointing step 4
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "the run never reached the mid-epoch checkpoint"
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    stage = killed / "tiny" / "teacher"
    last = torch.load(stage / "last.pt", weights_only=True)
    assert (last["resume"]["state"]["epoch"], last["resume"]["state"]["iteration"]) == (1, 3)  # mid-epoch
    assert not (stage / "model.pt").exists()
    assert max(r["step"] for r in _train_log(stage)) == 10  # logged a step that no checkpoint holds

    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    resumed = _launch(cfg, killed, tmp_path / "never", (-1, -1), "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out

    for name in ("last.pt", "model.pt"):
        a = torch.load(straight / "tiny" / "teacher" / name, weights_only=True)
        b = torch.load(stage / name, weights_only=True)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"{name}: {key} differs"
    a_opt = torch.load(straight / "tiny" / "teacher" / "last.pt", weights_only=True)["resume"]["optimizer"]["state"]
    b_opt = torch.load(stage / "last.pt", weights_only=True)["resume"]["optimizer"]["state"]
    assert all(torch.equal(a_opt[k]["momentum_buffer"], b_opt[k]["momentum_buffer"]) for k in a_opt)

    # The log of the resumed run is the uninterrupted one: steps after the checkpoint were dropped and redone.
    assert _train_log(stage) == _train_log(straight / "tiny" / "teacher")


def test_interrupted_ds2d2_student_resumes_exactly_with_adapter_and_adamw_state(tmp_path, monkeypatch):
    """In-process: the student stage (student + width adapter, AdamW) interrupted mid-epoch, then --resume."""
    import shutil

    import distill.trainer as trainer
    from distill.run import main
    from runtime.errors import UserError

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, schedule={"student": {"epochs": 2, "optimizer": "adamw", "lr": 0.001}})
    base = ["tiny", "--config", str(cfg), "--device", "cpu"]
    assert main([*base, "--stage", "teacher"]) == 0 and main([*base, "--stage", "amplifier"]) == 0
    for work in ("straight", "crashed"):
        shutil.copytree(tmp_path / "runs", tmp_path / work)
    assert main([*base, "--stage", "student", "--work-dir", str(tmp_path / "straight")]) == 0

    real_save = trainer.save_checkpoint

    def crash_before_second_epoch_step_2(path, payload):
        state = payload.get("resume", {}).get("state")
        if state is not None and (state["epoch"], state["iteration"]) == (1, 2):
            raise KeyboardInterrupt  # dies with last.pt at (epoch 1, iteration 1)
        return real_save(path, payload)

    monkeypatch.setattr(trainer, "save_checkpoint", crash_before_second_epoch_step_2)
    crashed = [*base, "--stage", "student", "--work-dir", str(tmp_path / "crashed")]
    with pytest.raises(KeyboardInterrupt):
        main(crashed)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    stage = tmp_path / "crashed" / "tiny" / "student-ds2d2"
    assert torch.load(stage / "last.pt", weights_only=True)["resume"]["modules"]["adapter"]  # adapter state saved
    assert main([*crashed, "--resume"]) == 0

    a = torch.load(tmp_path / "straight" / "tiny" / "student-ds2d2" / "last.pt", weights_only=True)
    b = torch.load(stage / "last.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key, value in a["resume"]["modules"]["adapter"].items():
        assert torch.equal(value, b["resume"]["modules"]["adapter"][key]), key
    opt_a, opt_b = a["resume"]["optimizer"]["state"], b["resume"]["optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)

    (stage / "model.pt").unlink()  # unfinished again, but now with another learning rate
    with pytest.raises(UserError, match="different configuration"):
        main([*crashed, "--resume", "--set", "schedule.student.lr=0.002"])

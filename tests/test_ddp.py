"""Scale-out: `torchrun --nproc_per_node=2 -m distill.run` trains with DDP over gloo on the CPU; rank 0 alone writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_config

REPO = Path(__file__).resolve().parent.parent


def test_two_gloo_processes_train_one_epoch_and_only_rank0_writes(tmp_path):
    # 12 images over 2 ranks = 6 each, batch 2 -> 3 DDP steps per epoch.
    cfg = tiny_config(tmp_path, schedule={"teacher": {"batch_size": 2}})
    work = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "distill.run", "tiny", "--config", str(cfg), "--stage", "teacher", "--device", "cpu",
           "--work-dir", str(work)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    stage = work / "tiny" / "teacher"
    records = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["world_size"] == 2
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == [1, 2, 3]  # one record per step: rank 1 wrote nothing
    assert sum(r["event"] == "finished" for r in records) == 1
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["run"]["world_size"] == 2 and metrics["run"]["steps"] == 3
    ckpt = torch.load(stage / "model.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["role"] == "teacher"
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert sorted(p.name for p in stage.iterdir()) == ["best.pt", "last.pt", "log.jsonl", "metrics.json", "model.pt"]
    summary = json.loads((work / "tiny" / "summary.json").read_text())
    assert [e["stage"] for e in summary["entries"]] == ["teacher"]
    assert summary["entries"][0]["world_size"] == 2

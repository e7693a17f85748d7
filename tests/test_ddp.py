"""Scale-out: `torchrun --nproc_per_node=2 -m distill.run` trains with DDP over gloo on the CPU: the ranks see
different batches yet hold the same weights after every step (gradients are all-reduced), and rank 0 alone writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_config

REPO = Path(__file__).resolve().parent.parent

# distill.run under torchrun, with every rank saving its trainable parameters before and after training.
DRIVER = """
import pathlib, sys
import torch
import distill.trainer as trainer
out, args = pathlib.Path(sys.argv[1]), sys.argv[2:]
real_fit, real_finish = trainer.StageTrainer.fit, trainer.StageTrainer._finish

def params(self):
    return {k: v.detach().clone() for k, v in self.task.model.named_parameters() if v.requires_grad}

def fit(self, *a, **kw):
    torch.save(params(self), out / f"start{self.info.rank}.pt")
    return real_fit(self, *a, **kw)

def finish(self, *a, **kw):
    torch.save(params(self), out / f"end{self.info.rank}.pt")
    return real_finish(self, *a, **kw)

trainer.StageTrainer.fit, trainer.StageTrainer._finish = fit, finish
from distill.run import main
from runtime.cli import run_cli
run_cli(main, args)
"""


def test_two_gloo_processes_keep_equal_weights_and_only_rank0_writes(tmp_path):
    # 12 images over 2 ranks = 6 each, batch 2 -> 3 DDP steps per epoch.
    cfg = tiny_config(tmp_path, schedule={"teacher": {"batch_size": 2}})
    work, dumps = tmp_path / "runs", tmp_path / "dumps"
    dumps.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(dumps), "tiny", "--config", str(cfg), "--stage", "teacher", "--device", "cpu", "--work-dir", str(work)]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # the driver is a script, not a module
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    start = [torch.load(dumps / f"start{r}.pt", weights_only=True) for r in (0, 1)]
    end = [torch.load(dumps / f"end{r}.pt", weights_only=True) for r in (0, 1)]
    assert start[0].keys() == end[1].keys() and len(start[0]) > 10
    moved = 0
    for key in start[0]:
        assert torch.equal(end[0][key], end[1][key]), f"{key} differs between the ranks after training"
        moved += not torch.equal(start[0][key], end[0][key])
    assert moved > len(start[0]) // 2  # the steps changed the weights: equal because the gradients were averaged

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
    for key, value in end[0].items():  # the saved model is the ranks' common weights
        assert torch.equal(ckpt["state_dict"][key], value), key
    assert sorted(p.name for p in stage.iterdir()) == ["last.pt", "log.jsonl", "metrics.json", "model.pt"]
    summary = json.loads((work / "tiny" / "summary.json").read_text())
    assert [e["stage"] for e in summary["entries"]] == ["teacher"]
    assert summary["entries"][0]["world_size"] == 2

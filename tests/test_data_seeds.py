"""benchmarks.data_seeds: the same recipe on other draws of the synthetic generator, one table."""
from __future__ import annotations

import json

from benchmarks.data_seeds import main

from conftest import tiny_config


def test_each_generator_seed_gets_its_own_data_and_teacher(tmp_path):
    cfg = tiny_config(tmp_path, distill={"method": "none"})
    out = tmp_path / "report"
    assert main(["tiny", "--config", str(cfg), "--seeds", "0", "1", "--out", str(out)]) == 0
    data = json.loads((out / "data_seeds.json").read_text())
    rows = {r["seed"]: r for r in data["seeds"]}
    assert set(rows) == {0, 1}
    assert rows[0]["dataset_root"] != rows[1]["dataset_root"] and rows[1]["dataset_root"].endswith("tiny-seed1")
    assert (tmp_path / "runs" / "tiny" / "teacher" / "model.pt").is_file()  # seed 0: the pipeline's own run
    assert (tmp_path / "runs" / "tiny-data-seed1" / "tiny" / "teacher" / "model.pt").is_file()
    # Different draws of the generator are different images
    first = sorted((tmp_path / "data" / "tiny" / "JPEGImages-trainval").iterdir())[0]
    other = tmp_path / "data" / "tiny-seed1" / "JPEGImages-trainval" / first.name
    assert first.read_bytes() != other.read_bytes()
    for r in rows.values():
        assert 0 <= r["teacher"]["AP50"] <= 1 and r["teacher"]["scored_on"].endswith("test")
    table = (out / "data_seeds.md").read_text()
    assert "| 0 |" in table and "| 1 |" in table and "mean +- std" in table

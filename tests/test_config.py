"""pipelines.yaml: the shipped file validates; bad keys, types and references name the key path and the line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runtime.config import DEFAULT_CONFIG, load_config
from runtime.errors import UserError

REQUIRED_PIPELINES = {"dior_retina", "dior_faster_rcnn", "dota_retina", "dota_faster_rcnn", "demo_retina", "demo_faster_rcnn"}
REQUIRED_TARGETS = {"jetson", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "x86-cuda", "cpu"}


def test_shipped_config_is_valid_and_complete():
    cfg = load_config()
    assert REQUIRED_PIPELINES <= set(cfg.pipelines)
    assert REQUIRED_TARGETS <= set(cfg.targets)
    for name in REQUIRED_PIPELINES:
        pipe = cfg.pipeline(name)
        assert pipe.teacher.arch == pipe.student.arch
        assert pipe.input_size % 32 == 0


@pytest.mark.parametrize("name", ["dior_retina", "dior_faster_rcnn", "dota_retina", "dota_faster_rcnn"])
def test_paper_settings(name):
    pipe = load_config().pipeline(name)
    assert (pipe.teacher.backbone, pipe.student.backbone) == ("resnet101", "resnet18")
    assert pipe.input_size == (800 if name.startswith("dior") else 1024)
    assert pipe.schedule.student.epochs == 24 and pipe.schedule.student.milestones == [16, 22]
    assert pipe.test.score_thresh == 0.05 and pipe.test.nms_iou == 0.5 and pipe.test.max_detections == 100


def test_reference_loss_weights():
    cfg = load_config()
    assert cfg.pipeline("dota_retina").distill.weights.explicit_low == 7e-5
    assert cfg.pipeline("dota_faster_rcnn").distill.weights.explicit_high == 1.2
    assert cfg.pipeline("dior_retina").distill.weights.implicit_full == 1.0


def _write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    mutate(raw)
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_unknown_key_names_path_and_line(tmp_path):
    path = _write(tmp_path, lambda r: r["pipelines"]["demo_retina"]["schedule"]["student"].update(epoch=3))
    with pytest.raises(UserError) as err:
        load_config(path)
    message = err.value.line()
    assert "pipelines.demo_retina.schedule.student.epoch" in message
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "epoch: 3" in text)
    assert f"pipelines.yaml:{line}" in message


def test_wrong_type_is_reported(tmp_path):
    path = _write(tmp_path, lambda r: r["pipelines"]["demo_retina"].update(input_size="big"))
    with pytest.raises(UserError, match=r"pipelines\.demo_retina\.input_size"):
        load_config(path)


def test_dangling_reference_is_reported(tmp_path):
    path = _write(tmp_path, lambda r: r["pipelines"]["demo_retina"].update(teacher="r152_retina"))
    with pytest.raises(UserError, match=r"pipelines\.demo_retina\.teacher.*r152_retina"):
        load_config(path)


def test_input_size_must_be_multiple_of_32(tmp_path):
    path = _write(tmp_path, lambda r: r["pipelines"]["demo_retina"].update(input_size=250))
    with pytest.raises(UserError, match="multiple of 32"):
        load_config(path)


def test_calibration_never_uses_test_split(tmp_path):
    path = _write(tmp_path, lambda r: r["pipelines"]["demo_retina"]["calibration"].update(split="test"))
    with pytest.raises(UserError, match="never the test split"):
        load_config(path)


def test_overrides_are_validated_and_relative_to_pipeline():
    cfg = load_config(overrides=["schedule.student.epochs=2", "student.fpn_width=48"], pipeline="demo_retina")
    pipe = cfg.pipeline("demo_retina")
    assert pipe.schedule.student.epochs == 2
    assert pipe.student.fpn_width == 48
    # the referenced model entry itself is untouched: only this pipeline's copy changed
    assert cfg.models["demo_student_retina"].fpn_width == 64
    with pytest.raises(UserError, match=r"--set pipelines\.demo_retina\.schedule\.student\.epochs"):
        load_config(overrides=["schedule.student.epochs=many"], pipeline="demo_retina")
    with pytest.raises(UserError, match="not_a_key"):
        load_config(overrides=["schedule.not_a_key=1"], pipeline="demo_retina")
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(overrides=["schedule.student.epochs"])


def test_unknown_pipeline_and_target_list_the_known_ones():
    cfg = load_config()
    with pytest.raises(UserError, match="demo_retina"):
        cfg.pipeline("nope")
    with pytest.raises(UserError, match="jetson-orin-nx"):
        cfg.target("tpu")


def test_resolved_pipeline_is_plain_data():
    data = load_config().pipeline("demo_retina").as_dict()
    assert data["student"]["backbone"] == "resnet18" and data["dataset"]["format"] == "dior"
    yaml.safe_dump(data)  # plain types only: it goes into checkpoints and hashes


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "pipelines.yaml"
    path.write_text("default_pipeline: x\npipelines: [unclosed\n")
    with pytest.raises(UserError, match=r"pipelines\.yaml:\d+"):
        load_config(path)


def test_config_loader_is_torch_free():
    code = "import sys, runtime.config as c; c.load_config(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent).returncode == 0

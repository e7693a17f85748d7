"""The stage trainer and its data: schedule, batches, flips, checkpoint files, log, non-finite loss, checkpoint errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.checkpoint import FORMAT, load_checkpoint, load_detector, save_checkpoint
from distill.data import DetectionDataset, epoch_batches, eval_batches
from distill.distributed import DistInfo
from distill.models import build_detector
from distill.stages import PipelineRunner
from distill.tasks import build_task
from distill.trainer import StageTrainer, lr_factor
from runtime.config import StageSchedule, load_config
from runtime.errors import UserError
from runtime.records import DetectionSet, ImageRecord


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact comparisons assume the same thread count as the subprocesses (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def schedule(**kw) -> StageSchedule:
    base = dict(epochs=24, batch_size=2, lr=0.01, warmup_iters=100, warmup_factor=0.001, milestones=[16, 22])
    return StageSchedule(**(base | kw))


def test_lr_warms_up_linearly_then_steps_down_at_milestone_epochs():
    s = schedule()
    assert lr_factor(0, s, 10) == pytest.approx(0.001)
    assert lr_factor(50, s, 10) == pytest.approx(0.5005)
    assert lr_factor(100, s, 10) == 1.0
    assert lr_factor(159, s, 10) == 1.0  # epoch 15
    assert lr_factor(160, s, 10) == pytest.approx(0.1)  # epoch 16
    assert lr_factor(220, s, 10) == pytest.approx(0.01)
    assert lr_factor(3, schedule(warmup_iters=0), 10) == 1.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), bs=st.integers(1, 8), world=st.integers(1, 4), epoch=st.integers(0, 5))
def test_batches_are_reproducible_equal_per_rank_and_cover_the_data(n, bs, world, epoch):
    ranks = [epoch_batches(n, bs, epoch, seed=3, info=DistInfo(r, world)) for r in range(world)]
    assert ranks == [epoch_batches(n, bs, epoch, seed=3, info=DistInfo(r, world)) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # every DDP rank runs the same number of steps
    seen = {i for r in ranks for b in r for i in b}
    assert seen <= set(range(n))
    per_rank = -(-n // world)  # DistributedSampler pads every rank to this many samples
    if per_rank >= bs:  # full batches only; the incomplete tail is dropped (drop_last)
        assert all(len(b) == bs for r in ranks for b in r) and len(ranks[0]) == per_rank // bs
    else:  # fewer samples than one batch: a single short batch, nothing dropped
        assert seen == set(range(n)) and len(ranks[0]) == 1
    shards = [i for r in range(world) for b in eval_batches(n, bs, DistInfo(r, world)) for i in b]
    assert sorted(shards) == list(range(n))  # evaluation sees each image exactly once


def test_epoch_order_changes_with_the_epoch():
    assert epoch_batches(20, 4, 0, 0) != epoch_batches(20, 4, 1, 0)


def _square_image(tmp_path, box):
    import cv2

    img = np.zeros((50, 80, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    path = tmp_path / "square.png"
    cv2.imwrite(str(path), img)
    rec = ImageRecord(path, 80, 50, np.array([box], np.float32), np.array([1]), np.array([False]))
    return DetectionSet("one", ("a", "b"), [rec])


def test_flips_happen_and_move_the_boxes_with_the_pixels(tmp_path):
    ds = DetectionDataset(_square_image(tmp_path, (10, 5, 30, 20)), input_size=64, augment_flip=True, seed=1)
    plain = DetectionDataset(ds.set, input_size=64)[0].target["boxes"][0]
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        sample = ds[0]
        assert sample.image.shape == (3, 64, 64) and sample.image.dtype == torch.float32
        box = sample.target["boxes"][0]
        x1, y1, x2, y2 = box.round().int().tolist()
        inside = sample.image[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1]
        assert inside.min() > 0.9 and sample.image.mean() < 0.2  # box follows the bright square
        assert sample.target["labels"].tolist() == [1]
        assert torch.equal(ds[0].image, sample.image)  # a pure function of (seed, epoch, index)
        horizontal = not torch.isclose(box[0], plain[0])
        vertical = not torch.isclose(box[1], plain[1])
        if horizontal:
            torch.testing.assert_close(box[[0, 2]], 64 - plain[[2, 0]])
        if vertical:
            torch.testing.assert_close(box[[1, 3]], 64 - plain[[3, 1]])
        seen.add((horizontal, vertical))
    # over 8 epochs the image was flipped both ways and left alone (the draws are fixed by the seed)
    assert any(h for h, _ in seen) and any(v for _, v in seen) and (False, False) in seen, seen
    unflipped = DetectionDataset(ds.set, input_size=64, augment_flip=False, seed=1)
    for epoch in range(8):
        unflipped.set_epoch(epoch)
        torch.testing.assert_close(unflipped[0].target["boxes"][0], plain)  # augment_flip: false never flips


def test_difficult_objects_are_not_training_targets(tmp_path):
    rec = _square_image(tmp_path, (10, 5, 30, 20)).records[0]
    rec = ImageRecord(rec.path, 80, 50, np.array([[10, 5, 30, 20], [40, 10, 60, 30]], np.float32),
                      np.array([0, 1]), np.array([True, False]))
    sample = DetectionDataset(DetectionSet("d", ("a", "b"), [rec]), 64)[0]
    assert sample.target["labels"].tolist() == [1]
    np.testing.assert_allclose(sample.target["boxes"][0].numpy(), [32, 12.8, 48, 38.4], rtol=1e-5)


def _teacher_trainer(cfg_path, epochs=1):
    pipe = load_config(cfg_path, [f"schedule.teacher.epochs={epochs}"]).pipeline("tiny")
    runner = PipelineRunner(pipe, torch.device("cpu"))
    train, select, test = runner.datasets("teacher")
    torch.manual_seed(0)
    model = build_detector(pipe.teacher, len(train.set.classes), pipe.input_size)
    meta = runner.meta("teacher", None, pipe.teacher.model_dump(), len(train.set.classes), list(train.set.classes),
                       {}, "hash0")
    out = pipe.work_dir / "t"
    trainer = StageTrainer(build_task("teacher", model=model), pipe.schedule.teacher, out, meta, torch.device("cpu"))
    return trainer, (train, select, test), out


def test_stage_writes_checkpoints_log_and_metrics(make_tiny_config):
    trainer, (train, select, test), out = _teacher_trainer(make_tiny_config())
    result = trainer.fit(train, select, test)
    assert {p.name for p in out.iterdir()} == {"last.pt", "model.pt", "log.jsonl", "metrics.json"}  # no val: no best
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]  # 12 images / batch 4
    assert {"classification", "bbox_regression", "loss", "lr"} <= set(train_records[0])
    assert records[-1]["event"] == "finished" and "AP50" in records[-1]

    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["format"] == FORMAT and ckpt["finished"] and ckpt["role"] == "teacher"
    assert ckpt["metrics"]["AP50"] == result.metrics["AP50"] and ckpt["classes"] == list(train.set.classes)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["params"] > 0 and metrics["run"]["gflops"] > 0 and metrics["config_hash"] == "hash0"

    model, meta = load_detector(out / "model.pt")
    image = torch.rand(1, 3, 64, 64)
    trainer.task.model.eval()
    with torch.no_grad():
        assert torch.equal(model(list(image))[0]["scores"], trainer.task.model(list(image))[0]["scores"])
    assert meta["input_size"] == 64 and "state_dict" not in meta


def test_non_finite_loss_stops_naming_the_images_and_keeps_last_good_checkpoint(make_tiny_config, monkeypatch):
    trainer, (train, select, test), out = _teacher_trainer(make_tiny_config())
    real_forward, calls = type(trainer.task).forward, []

    def forward(self, images, targets):
        losses = real_forward(self, images, targets)
        calls.append(1)
        if len(calls) == 3:  # third batch: blow up
            losses["classification"] = losses["classification"] * float("nan")
        return losses

    monkeypatch.setattr(type(trainer.task), "forward", forward)
    with pytest.raises(UserError) as err:
        trainer.fit(train, select, test)
    names = [r.path.name for r in train.set.records]
    assert "not finite" in err.value.what and "classification=nan" in err.value.what
    assert sum(name in err.value.what for name in names) == 4  # the batch's four image files
    last = load_checkpoint(out / "last.pt")
    assert last["resume"]["state"]["step"] == 2 and not last["finished"]
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (out / "model.pt").exists()
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["event"] == "error"


def test_finite_loss_with_non_finite_gradients_stops_before_the_weights_change(make_tiny_config, monkeypatch):
    """Without the check, clipping would scale an inf gradient by 0 and write NaN into every weight."""
    trainer, (train, select, test), out = _teacher_trainer(make_tiny_config())
    real_forward, calls = type(trainer.task).forward, []

    def forward(self, images, targets):
        losses = real_forward(self, images, targets)
        calls.append(1)
        if len(calls) == 3:  # sqrt at 0: value 0, slope infinite
            weight = self.model.head.classification_head.cls_logits.weight
            losses["steep"] = (weight.abs().sum() * 0.0).sqrt()
        return losses

    monkeypatch.setattr(type(trainer.task), "forward", forward)
    with pytest.raises(UserError) as err:
        trainer.fit(train, select, test)
    assert "gradients are not finite" in err.value.what and "steep=0" in err.value.what
    last = load_checkpoint(out / "last.pt")
    assert last["resume"]["state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in trainer.task.model.parameters())  # the step was never taken
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["event"] == "error"


def _spy_evaluations(monkeypatch, trainer) -> list[tuple[str, int, dict]]:
    """Record every evaluation: (split name, epochs done, a copy of the weights evaluated)."""
    import distill.trainer as trainer_module

    calls, real = [], trainer_module.evaluate

    def spy(model, batches, split, *args, **kwargs):
        calls.append((split.name, trainer.state.epoch, {k: v.clone() for k, v in model.state_dict().items()}))
        return real(model, batches, split, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    return calls


def test_without_a_val_split_the_final_epoch_is_kept_and_test_scores_once(make_tiny_config, monkeypatch):
    trainer, (train, select, test), out = _teacher_trainer(make_tiny_config(), epochs=2)
    assert select is None and test.set.name.endswith("test")
    calls = _spy_evaluations(monkeypatch, trainer)
    trainer.fit(train, select, test)
    assert [(name, epoch) for name, epoch, _ in calls] == [(test.set.name, 2)]  # once, at the end: never selects
    model = torch.load(out / "model.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    for key, value in model["state_dict"].items():
        assert torch.equal(value, last["state_dict"][key]) and torch.equal(value, calls[0][2][key]), key
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection"] == {"rule": "final epoch", "split": None, "metric": None, "epoch": 2}
    assert metrics["metrics"]["split"] == test.set.name and metrics["run"]["scored_on"] == test.set.name
    assert not (out / "best.pt").exists()


def test_a_val_split_selects_and_the_test_split_only_scores(make_tiny_config, monkeypatch):
    cfg = make_tiny_config(datasets={"tiny_synth": {"val_split": "val"}}, synthetic={"num_val": 4})
    trainer, (train, select, test), out = _teacher_trainer(cfg, epochs=2)
    val, tst = select.set.name, test.set.name
    assert val.endswith("val") and tst.endswith("test")
    calls = _spy_evaluations(monkeypatch, trainer)
    trainer.fit(train, select, test)
    assert [(name, epoch) for name, epoch, _ in calls] == [(val, 1), (val, 2), (tst, 2)]
    metrics = json.loads((out / "metrics.json").read_text())
    best_epoch = metrics["selection"]["epoch"]
    assert metrics["selection"]["split"] == val and metrics["selection"]["metric"] == "AP50"
    assert metrics["metrics"]["split"] == tst and best_epoch in (1, 2)
    model = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    best = torch.load(out / "best.pt", weights_only=True)["state_dict"]
    val_weights, test_weights = calls[best_epoch - 1][2], calls[-1][2]
    for key, value in model.items():  # model.pt = the val-selected weights, and exactly what test scored
        assert torch.equal(value, best[key]) and torch.equal(value, val_weights[key])
        assert torch.equal(value, test_weights[key]), key


def test_a_val_split_equal_to_the_test_split_is_refused(make_tiny_config):
    trainer, (train, _, test), _ = _teacher_trainer(make_tiny_config())
    with pytest.raises(UserError, match="both select and score"):
        trainer.fit(train, test, test)


def test_missing_and_corrupt_checkpoints_are_user_errors(tmp_path):
    missing = tmp_path / "runs" / "demo_retina" / "amplifier" / "model.pt"
    with pytest.raises(UserError, match=r"python -m distill.run demo_retina --stage amplifier"):
        load_detector(missing)
    with pytest.raises(UserError, match=r"--stage student --method pkd"):
        load_checkpoint(tmp_path / "runs" / "p" / "student-pkd" / "model.pt")
    corrupt = tmp_path / "model.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_detector(corrupt)
    save_checkpoint(corrupt, {"something": torch.zeros(1)})
    with pytest.raises(UserError, match="not a ds2d2-edge/1 checkpoint"):
        load_detector(corrupt)


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"format": FORMAT, "x": torch.ones(2)})

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"format": FORMAT, "x": torch.zeros(2)})
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary permissions, not mkstemp's 0600


class Oracle(torch.nn.Module):
    """A 'detector' answering each image (in evaluation order) with its ground truth in network-input pixels."""

    def __init__(self, dataset: DetectionDataset):
        super().__init__()
        self.answers = [dataset[i].target for i in range(len(dataset))]
        self.seen = 0

    def forward(self, images):
        out = []
        for _ in images:
            t = self.answers[self.seen]
            self.seen += 1
            out.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))})
        return out


def test_evaluation_maps_detections_back_to_original_pixels(tmp_path):
    import cv2

    from distill.data import make_loader
    from distill.engine import evaluate

    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate([(80, 50), (47, 120), (200, 64)]):  # non-square: the stretch differs per axis
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.zeros((h, w, 3), np.uint8))
        xy = rng.uniform(0, [w - 12, h - 12], size=(3, 2))
        boxes = np.hstack([xy, xy + rng.uniform(4, 12, size=(3, 2))]).astype(np.float32)
        records.append(ImageRecord(path, w, h, boxes, np.array([0, 1, 1]), np.zeros(3, bool)))
    dataset = DetectionDataset(DetectionSet("s", ("a", "b"), records), input_size=64)
    metrics = evaluate(Oracle(dataset), make_loader(dataset, eval_batches(3, 2), 0), dataset.set, torch.device("cpu"))
    assert metrics.AP == pytest.approx(1.0)  # boxes at IoU > 0.95 with the ground truth after mapping back
    shifted = Oracle(dataset)
    for t in shifted.answers:
        t["labels"] = 1 - t["labels"]  # wrong classes score nothing
    assert evaluate(shifted, make_loader(dataset, eval_batches(3, 2), 0), dataset.set, torch.device("cpu")).AP50 < 0.5

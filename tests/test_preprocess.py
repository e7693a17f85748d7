"""Pre-processing: reading images, resize geometry, and tensors identical to what torchvision's transform makes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from runtime.errors import UserError
from runtime.preprocess import (IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, normalize, preprocess_batch, read_image,
                                resize_image, to_training_array)


def test_read_image_is_rgb(tmp_path):
    img = np.zeros((5, 7, 3), np.uint8)
    img[..., 0] = 200  # red in RGB
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), img[..., ::-1])  # OpenCV writes BGR
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    assert out[0, 0].tolist() == [200, 0, 0]


def test_read_image_grayscale_becomes_three_channels(tmp_path):
    path = tmp_path / "gray.png"
    cv2.imwrite(str(path), np.full((4, 4), 77, np.uint8))
    assert read_image(path).shape == (4, 4, 3)


def test_read_image_missing_and_corrupt(tmp_path):
    with pytest.raises(UserError, match="image not found") as exc:
        read_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(exc.value)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(UserError, match="cannot decode"):
        read_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="cannot decode"):
        read_image(empty)


def test_spec_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError):
        PreprocessSpec(input_size=(64, 64), colour="rgb")
    with pytest.raises(ValidationError):
        PreprocessSpec(input_size=(0, 64))
    with pytest.raises(ValidationError):
        PreprocessSpec(input_size=(64, 64), resize="crop")
    spec = PreprocessSpec(input_size=(64, 96))
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD and spec.resize == "stretch"
    assert PreprocessSpec.model_validate_json(spec.model_dump_json()) == spec


def test_stretch_uses_opencv_inter_linear():
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out, tf = resize_image(img, PreprocessSpec(input_size=(64, 32)))
    np.testing.assert_array_equal(out, cv2.resize(img, (32, 64), interpolation=cv2.INTER_LINEAR))
    assert (tf.scale_x, tf.scale_y, tf.pad_x, tf.pad_y) == (32 / 70, 64 / 50, 0, 0)


def test_letterbox_keeps_aspect_and_pads():
    img = np.full((50, 100, 3), 255, np.uint8)
    out, tf = resize_image(img, PreprocessSpec(input_size=(64, 64), resize="letterbox", pad_value=0))
    assert out.shape == (64, 64, 3)
    assert tf.scale_x == tf.scale_y == 0.64 and (tf.pad_x, tf.pad_y) == (0, 16)
    assert out[:16].max() == 0 and out[48:].max() == 0 and out[16:48].min() == 255


@settings(max_examples=60, deadline=None)
@given(h=st.integers(8, 300), w=st.integers(8, 300), out=st.sampled_from([(64, 64), (32, 96), (128, 64)]),
       mode=st.sampled_from(["stretch", "letterbox"]), seed=st.integers(0, 2**31))
def test_boxes_round_trip_through_transform(h, w, out, mode, seed):
    """A box in the image maps into the input and back onto itself; anything maps back inside the image."""
    spec = PreprocessSpec(input_size=out, resize=mode)
    _, tf = resize_image(np.zeros((h, w, 3), np.uint8), spec)
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w, h], (10, 2))
    boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(0, 50, (10, 2)), [w, h])], axis=1).astype(np.float32)
    inp = tf.boxes_to_input(boxes)
    assert inp.min() >= -1e-3 and (inp[:, [0, 2]] <= out[1] + 1e-3).all() and (inp[:, [1, 3]] <= out[0] + 1e-3).all()
    np.testing.assert_allclose(tf.boxes_to_original(inp), boxes, atol=1e-3 * max(h, w))
    wild = tf.boxes_to_original(rng.uniform(-100, 400, (10, 4)))
    assert wild.min() >= 0 and (wild[:, [0, 2]] <= w).all() and (wild[:, [1, 3]] <= h).all()


def test_training_array_and_normalize_match_torchvision_transform():
    """What distill feeds torchvision (then normalised by its transform) equals the deployed network's input."""
    spec = PreprocessSpec(input_size=(64, 64))
    resized, _ = resize_image(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8), spec)
    train = to_training_array(resized)
    assert train.dtype == np.float32 and train.shape == (3, 64, 64) and 0 <= train.min() and train.max() <= 1
    transform = GeneralizedRCNNTransform(64, 64, list(spec.mean), list(spec.std))
    np.testing.assert_array_equal(transform.normalize(torch.from_numpy(train)).numpy(), normalize(resized, spec))


@settings(max_examples=20, deadline=None)
@given(mean=st.tuples(*[st.floats(-2, 2, width=32, allow_subnormal=False)] * 3),
       std=st.tuples(*[st.floats(0.0625, 5, width=32, allow_subnormal=False)] * 3), shift=st.integers(0, 255))
def test_normalize_is_torchvision_for_every_pixel_value(mean, std, shift):
    """Every uint8 value in every channel (normalize reads a 256-entry table per channel), any mean and std."""
    values = (np.arange(256, dtype=np.int64) + shift) % 256
    planes = [np.roll(values, 85 * c).reshape(16, 16) for c in range(3)]  # each channel sees all 256 values
    resized = np.stack(planes, axis=2).astype(np.uint8)
    spec = PreprocessSpec(input_size=(16, 16), mean=mean, std=std)
    transform = GeneralizedRCNNTransform(16, 16, list(spec.mean), list(spec.std))
    expected = transform.normalize(torch.from_numpy(to_training_array(resized))).numpy()
    np.testing.assert_array_equal(normalize(resized, spec), expected)
    np.testing.assert_array_equal(normalize(resized[None], spec), expected[None])


def test_preprocess_batch_equals_per_image():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 60), (64, 64), (100, 30)]]
    spec = PreprocessSpec(input_size=(32, 64), resize="letterbox")
    batch, transforms = preprocess_batch(images, spec)
    assert batch.shape == (3, 3, 32, 64) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for img, row, tf in zip(images, batch, transforms):
        resized, expected_tf = resize_image(img, spec)
        np.testing.assert_array_equal(row, normalize(resized, spec))
        assert tf == expected_tf
    half, _ = preprocess_batch(images[:1], spec.model_copy(update={"dtype": "float16"}))
    assert half.dtype == np.float16


def test_resize_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="uint8 RGB"):
        resize_image(np.zeros((10, 10), np.uint8), PreprocessSpec(input_size=(8, 8)))
    with pytest.raises(ValueError, match="uint8 RGB"):
        resize_image(np.zeros((10, 10, 3), np.float32), PreprocessSpec(input_size=(8, 8)))

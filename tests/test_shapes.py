"""The shapes benchmark: the generator's guarantees, the shipped model, and the issue's acceptance check."""

from __future__ import annotations

import importlib.resources

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import camfn
from camfn import metrics, shapes

TEST_IMAGES = 256
ACCURACY_FLOOR = 0.95  # measured 1.0 on these 256 images and on 1024; see benchmarks/train_shapes.py


@pytest.fixture(scope="module")
def test_split() -> shapes.Batch:
    return shapes.make(TEST_IMAGES, seed=shapes.TEST_SEED)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return shapes.load()


def test_same_seed_same_batch_other_seed_other_batch() -> None:
    a, b, c = shapes.make(16, seed=5), shapes.make(16, seed=5), shapes.make(16, seed=6)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.boxes, c.boxes)


def test_batch_types_and_shapes(test_split: shapes.Batch) -> None:
    n = TEST_IMAGES
    assert test_split.images.shape == (n, 3, 64, 64) and test_split.images.dtype == torch.float32
    assert test_split.labels.shape == (n,) and test_split.labels.dtype == torch.long
    assert test_split.boxes.shape == (n, 4) and test_split.boxes.dtype == torch.float32
    assert test_split.masks.shape == (n, 64, 64) and test_split.masks.dtype == torch.bool
    pixels = test_split.images * shapes.STD + shapes.MEAN  # back to about [0, 1] (plus noise)
    assert float(pixels.min()) > -0.5 and float(pixels.max()) < 1.5


def test_every_class_appears(test_split: shapes.Batch) -> None:
    counts = test_split.labels.bincount(minlength=len(shapes.CLASSES))
    assert len(counts) == len(shapes.CLASSES) and bool((counts >= TEST_IMAGES // 10).all())


def _check_boxes_hold_masks(batch: shapes.Batch) -> None:
    masks, boxes = batch.masks, batch.boxes.long()
    size = masks.shape[-1]
    assert bool(masks.flatten(1).any(1).all()), "an image without its object"
    assert bool(((boxes[:, :2] >= 0) & (boxes[:, 2:] <= size) & (boxes[:, :2] < boxes[:, 2:])).all())
    axis = torch.arange(size)
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    inside = (axis[None, None, :] >= x0) & (axis[None, None, :] < x1) & (axis[None, :, None] >= y0)
    inside &= axis[None, :, None] < y1
    assert not bool((masks & ~inside).any()), "object pixels outside the box"
    # tight: the mask touches all four sides of its box
    rows, cols = masks.any(2), masks.any(1)
    index = torch.arange(len(boxes))
    assert bool(cols[index, x0.flatten()].all() & cols[index, x1.flatten() - 1].all())
    assert bool(rows[index, y0.flatten()].all() & rows[index, y1.flatten() - 1].all())


def test_boxes_are_the_tight_boxes_of_nonempty_masks(test_split: shapes.Batch) -> None:
    _check_boxes_hold_masks(test_split)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([32, 48, 64]))
def test_boxes_hold_masks_for_any_seed_and_size(seed: int, size: int) -> None:
    _check_boxes_hold_masks(shapes.make(6, size=size, seed=seed))


def test_objects_are_spread_over_the_image(test_split: shapes.Batch) -> None:
    """Not only in the centre, so a centre prior cannot win the pointing game."""
    centres = (test_split.boxes[:, :2] + test_split.boxes[:, 2:]) / 2
    far = (centres - 32).abs().amax(1) > 16  # box centre in the outer ring of the image
    assert float(far.float().mean()) > 0.2


def test_object_pixels_differ_from_background(test_split: shapes.Batch) -> None:
    """The object is drawn: its pixels are brighter on average than the rest of its image."""
    brightness = test_split.images.mean(1)
    masks = test_split.masks.float()
    inside = (brightness * masks).sum((1, 2)) / masks.sum((1, 2))
    outside = (brightness * (1 - masks)).sum((1, 2)) / (1 - masks).sum((1, 2))
    assert bool((inside > outside + 1.0).all())


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(camfn.InputError, match="non-negative int"):
        shapes.make(-1)
    with pytest.raises(camfn.InputError, match="at least 16"):
        shapes.make(2, size=8)


def test_weights_ship_small_float32_and_load_in_eval_mode(model: torch.nn.Module) -> None:
    weights = importlib.resources.files("camfn") / "assets" / shapes.WEIGHTS
    assert weights.is_file() and len(weights.read_bytes()) < 200_000
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    assert shapes.load() is not model  # a fresh module each call, safe to modify


def test_tolerance_is_15_px_at_224_scaled() -> None:
    assert [shapes.tolerance(s) for s in (64, 112, 224)] == [4, 8, 15]


def test_test_accuracy(model: torch.nn.Module, test_split: shapes.Batch) -> None:
    with torch.no_grad():
        accuracy = float((model(test_split.images).argmax(1) == test_split.labels).float().mean())
    assert accuracy >= ACCURACY_FLOOR


def test_gradcam_pointing_game_at_least_0_9(model: torch.nn.Module, test_split: shapes.Batch) -> None:
    """The issue's acceptance check: Grad-CAM on the ground-truth class points into the box (4 px tolerance).

    Measured 0.996 on these 256 images (0.995 on 1024).
    """
    maps = camfn.gradcam(model, camfn.params(model), test_split.images, shapes.LAYER, test_split.labels)
    hits = metrics.pointing_game(maps, test_split.boxes, tolerance=shapes.tolerance(64))
    assert float(hits.float().mean()) >= 0.9


def test_demo_image_is_a_correctly_classified_test_sample(model: torch.nn.Module) -> None:
    x, label, box = shapes.demo_image()
    assert x.shape == (1, 3, 64, 64) and 0 <= label < len(shapes.CLASSES) and box.shape == (4,)
    with torch.no_grad():
        assert int(model(x).argmax(1)) == label

"""Differentiable maps: a Grad-CAM-based loss trains the model (attention-guided training on camfn.shapes)."""

from __future__ import annotations

import pytest
import torch
from conftest import GapNet, randomize_bn

import camfn
from camfn import shapes, training


def test_outside_share_closed_form():
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, False], [False, True]], [[True, True], [False, False]]])
    assert torch.allclose(training.outside_share(maps, masks), torch.tensor([3 / 8, 1.0]))  # a zero map counts as 1
    with pytest.raises(camfn.InputError, match="same shape"):
        training.outside_share(maps, masks[:, :1])


def test_gradient_of_the_map_loss_matches_finite_differences():
    """d/dtheta of a loss on the raw Grad-CAM map (a second derivative through the vjp), float64."""
    torch.manual_seed(0)
    net = randomize_bn(GapNet(classes=5, width=6)).double().eval()
    p = camfn.params(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    data = shapes.Batch(x, torch.tensor([1, 3]), torch.zeros(2, 4), torch.rand(2, 8, 8, generator=g) > 0.5)
    names = [k for k, _ in net.named_parameters()]

    def loss(train):
        return training.guided_loss(camfn.gradcam, net, {**p, **train}, data, "relu")

    theta = {k: p[k] for k in names}
    grads = torch.func.grad(loss)(theta)
    direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in theta.items()}
    h = 1e-6
    plus = loss({k: v + h * direction[k] for k, v in theta.items()})
    minus = loss({k: v - h * direction[k] for k, v in theta.items()})
    numeric = (plus - minus) / (2 * h)
    analytic = sum((grads[k] * direction[k]).sum() for k in names)
    assert grads["conv1.weight"].abs().max() > 0  # the map depends on weights before the layer
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_guided_finetuning_moves_maps_into_the_mask():
    """32 Adam steps of CE + outside share on the shipped shapes net; held-out maps move onto the objects."""
    model = shapes.load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = camfn.params(model)
    train = shapes.make(256, seed=shapes.TRAIN_SEED + 7)
    test = shapes.make(64, seed=shapes.TEST_SEED)
    batches = [shapes.Batch(*(t[i : i + 16] for t in train)) for i in range(0, 256, 16)] * 2

    def held_out(q):
        maps = camfn.gradcam(model, q, test.images, shapes.LAYER, test.labels, normalize=False)
        accuracy = (camfn.apply(model, q, test.images).argmax(1) == test.labels).float().mean()
        return float(training.outside_share(maps, test.masks).mean()), float(accuracy)

    share0, acc0 = held_out(p)
    history = training.finetune(camfn.gradcam, model, p, batches, shapes.LAYER, lr=1e-3)
    share1, acc1 = held_out(history.params)
    first, last = sum(history.losses[:8]) / 8, sum(history.losses[-8:]) / 8
    assert last < first - 0.05, history.losses
    assert share1 < share0 - 0.1, (share0, share1)
    assert acc1 >= acc0 - 0.05, (acc0, acc1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not touched

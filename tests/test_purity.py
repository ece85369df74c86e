"""camfn never touches the user's model: parameters, buffers, modes, hooks and .grad stay exactly as they were."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import CNN_METHODS, GapNet, randomize_bn
from torch import nn
from torch.nn.utils import prune

import camfn


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: (id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "training": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [
            (n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for n, m in model.named_modules()
        ],
        "grads": {k: p.grad for k, p in model.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "inplace": [(n, m.inplace) for n, m in model.named_modules() if hasattr(m, "inplace")],
        "dict_ids": [(n, id(m._parameters), id(m._buffers), id(m._modules)) for n, m in model.named_modules()],
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for k, (ident, value) in before["state"].items():
        assert after["state"][k][0] == ident, f"{k} was replaced"
        assert torch.equal(after["state"][k][1], value), f"{k} was written"
    for key in ("training", "hooks", "grads", "requires_grad", "inplace", "dict_ids"):
        assert before[key] == after[key], key


@pytest.mark.parametrize("method", sorted(CNN_METHODS))
def test_model_untouched_by_every_method(method: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(GapNet()).eval()
    model.fc.train()  # a mixed-mode model must stay mixed
    before = _snapshot(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x_before = x.detach().clone()
    maps = camfn.METHODS[method](model, camfn.params(model), x, "act", torch.tensor([[1, 2], [0, 4]]))
    maps.sum().backward()  # maps are differentiable w.r.t. x through autograd too
    _assert_same(before, _snapshot(model))
    assert torch.equal(x.detach(), x_before)
    assert all(p.grad is None for p in model.parameters()), "a .grad was written on the model"


def test_untouched_during_the_call() -> None:
    """Observed from inside the forward: the user's modules see no swapped tensors, no mode change."""
    torch.manual_seed(0)
    seen = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            state = model.state_dict(keep_vars=True)
            seen.append((model.training, all(v is original[k] for k, v in state.items())))
            return x

    class SpyNet(GapNet):
        def __init__(self) -> None:
            super().__init__()
            self.spy = Spy()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.spy(self.act(self.conv2(self.relu(self.bn(self.conv1(x))))))
            return self.fc(torch.flatten(self.pool(x), 1))

    model = randomize_bn(SpyNet()).eval()
    original = dict(model.state_dict(keep_vars=True))
    x = torch.randn(1, 3, 8, 8)
    other = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in camfn.params(model).items()}
    leaf = {"tracer_options": {"leaf_modules": [Spy]}}  # so the spy runs at execution time, not only in tracing
    own = camfn.gradcam(model, camfn.params(model), x, "act", 1, relu=False, normalize=False, **leaf)
    swapped = camfn.gradcam(model, other, x, "act", 1, relu=False, normalize=False, **leaf)
    assert not torch.allclose(own, swapped), "the params passed were not used"
    assert len(seen) >= 2, "spy did not run inside the calls"
    assert all(not training and same for training, same in seen)


def test_no_leak_after_model_is_deleted() -> None:
    model = GapNet().eval()
    camfn.gradcam(model, camfn.params(model), torch.randn(1, 3, 8, 8), "act", 0)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "camfn's cache keeps the model alive"


def test_foreign_hooks_error_names_module_and_way_out() -> None:
    model = GapNet().eval()
    handle = model.conv2.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(camfn.HookError) as info:
        camfn.gradcam(model, camfn.params(model), torch.randn(1, 3, 8, 8), "act", 0)
    msg = str(info.value)
    assert "conv2" in msg and "forward hook" in msg and "hooks='ignore'" in msg and "handle.remove()" in msg
    handle.remove()


def test_gradcam_extractor_hooks_ignored_on_request() -> None:
    """A grad-cam extractor left on the model: hooks='ignore' explains the hook-free model, hooks untouched."""
    from pytorch_grad_cam import GradCAM

    torch.manual_seed(0)
    model = randomize_bn(GapNet()).eval()
    p, x = camfn.params(model), torch.randn(2, 3, 8, 8)
    clean = camfn.gradcam(model, p, x, "act", 1)
    extractor = GradCAM(model, [model.act])
    hooks = dict(model.act._forward_hooks)
    assert hooks
    with pytest.raises(camfn.HookError, match="act"):
        camfn.gradcam(model, p, x, "act", 1)
    torch.testing.assert_close(camfn.gradcam(model, p, x, "act", 1, hooks="ignore"), clean)
    assert dict(model.act._forward_hooks) == hooks
    assert extractor.activations_and_grads.activations == [], "grad-cam's hook ran inside camfn"
    extractor.activations_and_grads.release()


def test_value_changing_hooks_kept_on_request() -> None:
    torch.manual_seed(0)
    model = GapNet().eval()
    p, x = camfn.params(model), torch.randn(2, 3, 8, 8)
    handle = model.conv2.register_forward_hook(lambda m, i, o: o * 2 + 1)
    kept = camfn.hirescam(model, p, x, "act", 1, hooks="keep", relu=False, size=None, normalize=False)
    handle.remove()
    reference = GapNet().eval()
    reference.load_state_dict(model.state_dict())
    reference.conv2.weight.data.mul_(2)
    reference.conv2.bias.data.mul_(2).add_(1)
    expected = camfn.hirescam(reference, camfn.params(reference), x, "act", 1, relu=False, size=None, normalize=False)
    torch.testing.assert_close(kept, expected)


def test_pruned_model_uses_masked_weights() -> None:
    """torch.nn.utils.prune hooks define the weight: kept automatically, and read from params."""
    torch.manual_seed(0)
    model = GapNet().eval()
    prune.l1_unstructured(model.conv2, "weight", amount=0.5)
    x = torch.randn(2, 3, 8, 8)
    maps = camfn.gradcam(model, camfn.params(model), x, "act", 2)
    baked = GapNet().eval()
    state = {k.replace("weight_orig", "weight"): v for k, v in model.state_dict().items() if "mask" not in k}
    state["conv2.weight"] = model.conv2.weight_orig * model.conv2.weight_mask
    baked.load_state_dict(state)
    torch.testing.assert_close(maps, camfn.gradcam(baked, camfn.params(baked), x, "act", 2))
    # a different mask passed through params changes the map accordingly
    p = camfn.params(model)
    p["conv2.weight_mask"] = torch.ones_like(p["conv2.weight_mask"])
    unpruned = GapNet().eval()
    unpruned.load_state_dict({**state, "conv2.weight": model.conv2.weight_orig.detach()})
    torch.testing.assert_close(
        camfn.gradcam(model, p, x, "act", 2), camfn.gradcam(unpruned, camfn.params(unpruned), x, "act", 2)
    )

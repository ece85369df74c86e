"""Perturbation methods, smoothing options: parity with grad-cam / torchcam, slow loops written from the
formulas, chunk-size invariance, vmap = loop, seeds.

Parity tolerance: max abs difference <= 1e-4 on the [0, 1] maps, models in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from conftest import CNN_METHODS, GapNet, double_gapnet, image, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

import camfn
from camfn.methods.perturbation import masks_normalize_first
from camfn.postprocess import finish

TOL = 1e-4
RAW = {"relu": False, "size": None, "normalize": False}
PERTURBATION = ["ablationcam", "scorecam", "sscam", "iscam", "smooth_gradcampp"]
SMALL = {"sscam": {"n": 2}, "iscam": {"n": 2}, "smooth_gradcampp": {"n": 3}}


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(num_classes=10)).double().eval()


@pytest.fixture(scope="module")
def vgg() -> torch.nn.Module:
    torch.manual_seed(1)
    return randomize_bn(torchvision.models.vgg11_bn(num_classes=10)).double().eval()


@pytest.fixture(scope="module")
def net() -> GapNet:
    return double_gapnet(2)


_image = image


def _nontrivial(maps: np.ndarray) -> None:
    spans = maps.reshape(maps.shape[0], -1).max(1) - maps.reshape(maps.shape[0], -1).min(1)
    assert (spans > 0.5).all(), "reference maps are flat: the comparison would prove nothing"


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize(("name", "method"), [("ablationcam", "AblationCAM"), ("scorecam", "ScoreCAM")])
@pytest.mark.parametrize(
    ("model_name", "layer", "module", "size"), [("resnet", "layer3", "layer3", 64), ("vgg", "features.6", None, 32)]
)
def test_parity_with_gradcam(
    request, name: str, method: str, model_name: str, layer: str, module: str | None, size: int
) -> None:
    """One image (grad-cam re-runs the whole network per channel: the slow side of this test)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = request.getfixturevalue(model_name)
    x, t = _image(1, size), torch.tensor([3])
    ours = camfn.METHODS[name](model, camfn.params(model), x, layer, t).numpy()
    target_layer = model.get_submodule(module or layer)
    with getattr(pytorch_grad_cam, method)(model, [target_layer]) as extractor:
        extractor.batch_size = 64
        ref = extractor(x, [ClassifierOutputTarget(int(c)) for c in t])
    assert not model.training
    _nontrivial(ref)
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize(("name", "method", "kwargs"), [("sscam", "SSCAM", {"std": 2.0}), ("iscam", "ISCAM", {})])
@pytest.mark.parametrize(("model_name", "layer", "size"), [("resnet", "layer3", 64), ("vgg", "features.6", 32)])
def test_parity_with_torchcam_same_noise(
    request, name: str, method: str, kwargs: dict, model_name: str, layer: str, size: int
) -> None:
    """torchcam draws its noise from the global generator; seeding both the same way aligns the streams."""
    import torchcam.methods

    model = request.getfixturevalue(model_name)
    x = _image(1, size, seed=3)
    seed = {"seed": 11} if name == "sscam" else {}
    ours = camfn.METHODS[name](model, camfn.params(model), x, layer, 5, n=2, size=None, **seed, **kwargs)
    torch.manual_seed(11)
    with getattr(torchcam.methods, method)(model, layer, batch_size=64, num_samples=2, **kwargs) as extractor:
        scores = model(x)
        ref = extractor(5, scores)[0]
    _nontrivial(ref.numpy())
    assert (ours - ref).abs().max() <= TOL


# ------------------------------------------------------------------------------------ slow loops
def test_ablationcam_equals_loop_over_channels(resnet: torch.nn.Module) -> None:
    """Both ablation values, written as a loop that zeroes one channel and re-runs the tail by hand."""
    x, c = _image(2, 32, seed=4), torch.tensor([1, 4])
    a = resnet.layer3(resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))))

    def tail(h: torch.Tensor) -> torch.Tensor:
        return resnet.fc(torch.flatten(resnet.avgpool(resnet.layer4(h)), 1)).gather(1, c[:, None])[:, 0]

    for ablation in ("zero", "min"):
        y = tail(a)
        weights = torch.zeros(2, a.shape[1], dtype=torch.float64)
        for k in range(a.shape[1]):
            ablated = a.clone()
            fill = 0.0 if ablation == "zero" else a.amin((1, 2, 3)) - 1e7
            ablated[:, k] = fill if ablation == "zero" else fill[:, None, None]
            weights[:, k] = (y - tail(ablated)) / y
        expected = (weights[:, :, None, None] * a).sum(1)
        got = camfn.ablationcam(resnet, camfn.params(resnet), x, "layer3", c, ablation=ablation, **RAW)
        torch.testing.assert_close(got, expected)


def test_sscam_and_iscam_equal_formula_loops(net: GapNet) -> None:
    x, c = _image(2, 8, seed=5), torch.tensor([0, 3])
    a = net.act(net.conv2(net.relu(net.bn(net.conv1(x)))))
    masks = masks_normalize_first(a, (8, 8))
    y = net(x).gather(1, c[:, None])[:, 0]
    g = torch.Generator().manual_seed(9)
    noise = [torch.randn(masks.shape[1:], generator=g, dtype=torch.float32).double() * 0.5 for _ in range(3)]
    ss = torch.zeros(2, a.shape[1], dtype=torch.float64)
    is_ = torch.zeros(2, a.shape[1], dtype=torch.float64)
    for k in range(a.shape[1]):
        for i in range(3):
            ss[:, k] += net(x * (masks[:, k : k + 1] + noise[i][k])).gather(1, c[:, None])[:, 0] - y
            coeff = sum(j / 3 for j in range(1, i + 2))
            is_[:, k] += net(coeff * x * masks[:, k : k + 1]).gather(1, c[:, None])[:, 0] - y
    for name, total, kw in (("sscam", ss, {"std": 0.5, "seed": 9}), ("iscam", is_, {})):
        expected = ((total / 3).softmax(1)[:, :, None, None] * a).sum(1)
        got = camfn.METHODS[name](net, camfn.params(net), x, "act", c, n=3, **kw, **RAW)
        torch.testing.assert_close(got, expected)


def test_smooth_gradcampp_equals_formula_loop(net: GapNet) -> None:
    x, c = _image(2, 8, seed=6), torch.tensor([1, 2])
    params = camfn.params(net)
    noise = camfn.noise.gaussian((4, 3, 8, 8), 0.2, 13, dtype=torch.float64)
    grads = []
    for eps in noise:  # gradient at each noisy input, from autograd on the plain model
        xi = (x + eps).requires_grad_(False)
        h = net.conv2(net.relu(net.bn(net.conv1(xi))))
        a_i = net.act(h).detach().requires_grad_(True)
        score = net.fc(torch.flatten(net.pool(a_i), 1)).gather(1, c[:, None]).sum()
        grads.append(torch.autograd.grad(score, a_i)[0])
    g = torch.stack(grads)
    d1, d2, d3 = g.mean(0), g.pow(2).mean(0), g.pow(3).mean(0)
    a = net.act(net.conv2(net.relu(net.bn(net.conv1(x)))))
    alpha = d2 / (2 * d2 + a.sum((2, 3), keepdim=True) * d3 + 1e-6)
    alpha = torch.where(d2 != 0, alpha, torch.zeros_like(alpha))
    expected = ((alpha * d1.clamp(min=0)).sum((2, 3), keepdim=True) * a).sum(1)
    got = camfn.smooth_gradcampp(net, params, x, "act", c, n=4, std=0.2, seed=13, **RAW)
    torch.testing.assert_close(got, expected)
    exact = camfn.smooth_gradcampp(net, params, x, "act", c, n=2, std=0.0)
    torch.testing.assert_close(exact, camfn.gradcampp(net, params, x, "act", c))


# ------------------------------------------------------------------------------------ properties
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


@SETTINGS
@given(method=st.sampled_from(PERTURBATION), chunk=st.integers(1, 7), seed=st.integers(0, 1000))
def test_result_does_not_depend_on_chunk_size(net: GapNet, method: str, chunk: int, seed: int) -> None:
    x, t = _image(2, 8, seed), torch.tensor([[0, 1], [2, 4]])
    fn = camfn.METHODS[method]
    whole = fn(net, camfn.params(net), x, "act", t, chunk_size=None, **SMALL.get(method, {}))
    torch.testing.assert_close(
        fn(net, camfn.params(net), x, "act", t, chunk_size=chunk, **SMALL.get(method, {})), whole
    )


@pytest.mark.parametrize("method", PERTURBATION)
def test_vmap_over_samples_equals_loop_and_batch(net: GapNet, method: str) -> None:
    x, t = _image(3, 8, seed=7), torch.tensor([0, 2, 4])
    fn = camfn.METHODS[method]
    kw = SMALL.get(method, {})
    mapped = vmap(lambda xi, ti: fn(net, camfn.params(net), xi[None], "act", ti[None], **kw)[0])(x, t)
    looped = torch.stack([fn(net, camfn.params(net), x[i : i + 1], "act", t[i : i + 1], **kw)[0] for i in range(3)])
    torch.testing.assert_close(mapped, looped)
    torch.testing.assert_close(fn(net, camfn.params(net), x, "act", t, **kw), looped)


@pytest.mark.parametrize("method", ["sscam", "smooth_gradcampp"])
def test_seeded_methods_reproducible_and_seed_dependent(net: GapNet, method: str) -> None:
    """At "relu" the gradient depends on the input (at "act", after which GAP + linear follow, it would not)."""
    x, fn, p = _image(2, 8, seed=8), camfn.METHODS[method], camfn.params(net)
    first = fn(net, p, x, "relu", 1, n=2, seed=3, **RAW)
    torch.testing.assert_close(fn(net, p, x, "relu", 1, n=2, seed=3, **RAW), first)
    assert not torch.allclose(fn(net, p, x, "relu", 1, n=2, seed=4, **RAW), first)
    gen = torch.Generator().manual_seed(3)
    torch.testing.assert_close(fn(net, p, x, "relu", 1, n=2, seed=gen, **RAW), first)


def test_ablation_near_zero_score_is_an_error(net: GapNet) -> None:
    x = _image(1, 8)
    with pytest.raises(camfn.TargetError, match=r"\(y - y_k\) / y are undefined.*relative=False"):
        camfn.ablationcam(net, camfn.params(net), x, "act", lambda out: out[:, 0] - out[:, 0])
    flat = camfn.ablationcam(net, camfn.params(net), x, "act", lambda out: out[:, 0] * 0, relative=False)
    assert torch.isfinite(flat).all() and flat.eq(0).all()


def test_bad_perturbation_options(net: GapNet) -> None:
    x, p = _image(1, 8), camfn.params(net)
    with pytest.raises(camfn.OptionError, match="ablation="):
        camfn.ablationcam(net, p, x, "act", 0, ablation="mean")
    with pytest.raises(camfn.OptionError, match="n=0"):
        camfn.sscam(net, p, x, "act", 0, n=0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        camfn.scorecam(net, p, x, "act", 0, chunk_size=0)
    with pytest.raises(camfn.OptionError, match="seed='a'"):
        camfn.sscam(net, p, x, "act", 0, seed="a")


def test_progress_bar_is_opt_in(net: GapNet, capsys: pytest.CaptureFixture[str]) -> None:
    x, p = _image(1, 8), camfn.params(net)
    camfn.ablationcam(net, p, x, "act", 0, chunk_size=2)
    assert "ablationcam" not in capsys.readouterr().err
    camfn.ablationcam(net, p, x, "act", 0, chunk_size=2, progress=True)
    assert "ablationcam" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- smoothing
@pytest.mark.parametrize("method", sorted(CNN_METHODS))
def test_aug_smooth_is_the_average_of_six_views(net: GapNet, method: str) -> None:
    x, c = _image(2, 8, seed=9), torch.tensor([1, 3])
    fn, p, kw = camfn.METHODS[method], camfn.params(net), SMALL.get(method, {})
    views = []
    for flip in (False, True):
        for factor in (1.0, 1.1, 0.9):
            m = fn(net, p, (x.flip(-1) if flip else x) * factor, "act", c, **kw)
            views.append(m.flip(-1) if flip else m)
    expected = camfn.postprocess.normalize(torch.stack(views).mean(0))
    torch.testing.assert_close(fn(net, p, x, "act", c, aug_smooth=True, **kw), expected)


def test_aug_smooth_default_target_is_clean_top1(net: GapNet) -> None:
    x, p = _image(2, 8, seed=10), camfn.params(net)
    top = net(x).argmax(1)
    torch.testing.assert_close(
        camfn.gradcam(net, p, x, "act", aug_smooth=True), camfn.gradcam(net, p, x, "act", top, aug_smooth=True)
    )


def test_aug_smooth_parity_with_gradcam(resnet: torch.nn.Module) -> None:
    """grad-cam averages the six normalised views without renormalising; camfn renormalises."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = _image(1, 64, seed=11)
    ours = camfn.gradcam(resnet, camfn.params(resnet), x, "layer4", 3, aug_smooth=True)
    with GradCAM(resnet, [resnet.layer4]) as extractor:
        ref = extractor(x, [ClassifierOutputTarget(3)], aug_smooth=True)
    ref = camfn.postprocess.normalize(torch.from_numpy(ref).double())
    assert (ours - ref).abs().max() <= TOL


@pytest.mark.parametrize(
    ("name", "method"), [("gradcam", "GradCAM"), ("layercam", "LayerCAM"), ("scorecam", "ScoreCAM")]
)
def test_eigen_smooth_parity_with_gradcam_up_to_sign(resnet: torch.nn.Module, name: str, method: str) -> None:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = _image(1, 64, seed=12)
    raw = camfn.METHODS[name](resnet, camfn.params(resnet), x, "layer4", 3, eigen_smooth=True, **RAW)
    with getattr(pytorch_grad_cam, method)(resnet, [resnet.layer4]) as extractor:
        extractor.batch_size = 64
        ref = torch.from_numpy(extractor(x, [ClassifierOutputTarget(3)], eigen_smooth=True)).double()
    _nontrivial(ref.numpy())
    best = min((finish(sign * raw, x) - ref).abs().max() for sign in (1, -1))
    assert best <= TOL


def test_eigen_smooth_is_first_component_of_contributions(net: GapNet) -> None:
    x, c, p = _image(2, 8, seed=13), torch.tensor([0, 1]), camfn.params(net)
    a = net.act(net.conv2(net.relu(net.bn(net.conv1(x)))))
    w = net.fc.weight[c]
    expected = camfn.postprocess.first_component((w[:, :, None, None] * a).unsqueeze(1))[:, 0]
    torch.testing.assert_close(camfn.cam(net, p, x, "act", c, eigen_smooth=True, **RAW), expected)


# ----------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "mobilenet_v3_small"])
def test_split_head_then_tail_is_the_model_at_every_layer(arch: str) -> None:
    """Cutting after any node (inside residual blocks, dense concatenations, squeeze-excitation) and
    running head then tail gives the model's output: the values crossing the cut are handed over."""
    torch.manual_seed(3)
    model = randomize_bn(getattr(torchvision.models, arch)(num_classes=5)).eval()
    x, p = torch.randn(2, 3, 32, 32), camfn.params(model)
    traced = camfn.tracing.trace(model)
    expected = model(x)
    nodes = list(traced.qualname)
    crossing = 0
    for node in nodes[:: max(1, len(nodes) // 40)]:
        cut = camfn.rewrite.cut_after(traced, node)
        a, extras = cut.head(p, x)
        crossing += len(extras)
        torch.testing.assert_close(cut.tail(p, a, *extras), expected)
    assert crossing > 0, "no cut had a value crossing it: the test would not exercise skip connections"


def test_split_tail_never_writes_head_values() -> None:
    """resnet's BasicBlock applies an in-place ReLU right after bn1: the tail must not write the head's tensor."""
    torch.manual_seed(4)
    model = torchvision.models.resnet18(num_classes=3).eval()
    traced, p, x = camfn.tracing.trace(model), camfn.params(model), torch.randn(1, 3, 32, 32)
    cut = camfn.rewrite.cut_after(traced, traced.resolve("layer4.0.bn1"))
    a, extras = cut.head(p, x)
    before = a.clone()
    cut.tail(p, a, *extras)
    assert (before < 0).any() and torch.equal(a, before)


class _Counted(GapNet):
    """GapNet whose forward records the batch size of every input it sees (through a leaf module)."""

    def __init__(self) -> None:
        super().__init__(classes=3, width=8)
        self.seen: list[int] = []
        self.count = _Count(self.seen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.count(x))


class _Count(torch.nn.Module):
    def __init__(self, seen: list[int]) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return x


COUNTED = {"tracer_options": {"leaf_modules": [_Count]}, "chunk_size": None}


def test_scorecam_scores_the_zero_mask_once() -> None:
    """Channels that are zero in every sample give the same masked input (zeros): one copy for all of them."""
    torch.manual_seed(5)
    model = _Counted()
    with torch.no_grad():  # channels 0..4 of conv2 are dead after the ReLU
        model.conv2.weight[:5] = 0
        model.conv2.bias[:5] = -1
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    maps = camfn.scorecam(model, camfn.params(model), x, "act", 1, **COUNTED)
    # clean forward (2) + head-only forward (2) + (the zero input + 3 live channels) x 2 samples
    assert model.seen[-3:] == [2, 2, 8], model.seen
    a = model.act(model.conv2(model.relu(model.bn(model.conv1(x)))))
    assert a[:, :5].eq(0).all() and a[:, 5:].flatten(2).amax(-1).gt(0).all()
    assert maps.shape == (2, 8, 8)


@pytest.mark.parametrize("seed", [6, 7])
def test_scorecam_scores_each_distinct_mask_once(seed: int) -> None:
    """Channels with the same min-max normalised map in every sample share a mask: each distinct one is
    scored once, and the map is the formula's, looped over every channel."""
    torch.manual_seed(seed)
    model = _Counted().double()
    with torch.no_grad():  # channels 4..7 of conv2: copies of 0..3
        model.conv2.weight[4:] = model.conv2.weight[:4]
        model.conv2.bias[4:] = model.conv2.bias[:4]
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    p = camfn.params(model)
    maps = camfn.scorecam(model, p, x, "act", 1, **COUNTED, **RAW)
    a = model.act(model.conv2(model.relu(model.bn(model.conv1(x)))))
    span = a.flatten(2).amax(-1) - a.flatten(2).amin(-1)
    assert (span > 0).all()  # no constant channel: the saving is from the copies alone
    assert model.seen[-1] == 4 * 2, model.seen  # 4 distinct masks x 2 samples in one forward
    up = torch.nn.functional.interpolate(a, size=(8, 8), mode="bilinear", align_corners=True)
    low, high = up.flatten(2).amin(-1)[..., None, None], up.flatten(2).amax(-1)[..., None, None]
    masks = (up - low) / (high - low + 1e-8)
    with torch.no_grad():
        s = torch.stack([model(x * masks[:, k : k + 1])[:, 1] for k in range(a.shape[1])], 1)  # (B, K)
    expected = (s.softmax(1)[..., None, None] * a).sum(1)
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)


def test_scorecam_masks_equal_in_one_sample_only_are_scored_apart() -> None:
    """A mask is shared only when it is the same in every sample of the batch: channels 0 and 1 are equal in
    sample 0 and differ in sample 1, and the map is still the formula's, looped over every channel."""
    torch.manual_seed(8)
    fc = torch.nn.Linear(3, 4).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    x[0, 1] = x[0, 0]

    def tail(a: torch.Tensor) -> torch.Tensor:
        return fc(a.mean((2, 3)))

    cut = camfn.Cut(lambda t: torch.relu(t), tail)
    maps = camfn.scorecam(cut, camfn.params(cut), x, "head", 2, **RAW)
    a = torch.relu(x)
    up = torch.nn.functional.interpolate(a, size=(6, 6), mode="bilinear", align_corners=True)
    low, high = up.flatten(2).amin(-1)[..., None, None], up.flatten(2).amax(-1)[..., None, None]
    masks = (up - low) / (high - low + 1e-8)
    with torch.no_grad():
        s = torch.stack([tail(torch.relu(x * masks[:, k : k + 1]))[:, 2] for k in range(3)], 1)
    expected = (s.softmax(1)[..., None, None] * a).sum(1)
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)

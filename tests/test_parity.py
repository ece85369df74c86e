"""Parity of camfn with the reference libraries grad-cam 1.5.7 and torchcam 0.5.0.

Models: torchvision ``resnet18``, ``vgg11_bn``, ``mobilenet_v3_small`` and ``densenet121`` with random
weights, randomised BatchNorm affine parameters and non-trivial BatchNorm running statistics (a few
train-mode passes on random data, then ``eval()``), all in float64 (see METHODS.md: min-max normalisation
of near-flat random-weight maps magnifies float32 rounding). Input: 2 random images of 112 x 112 with a
different class target per image (its highest-scoring class not taken by the other image).

Tolerance: every comparison is between maps in ``[0, 1]`` and requires a maximum absolute difference of at
most ``ATOL = 1e-4``. Every reference map must also span at least 0.5 per sample (it is not trivially flat),
so a wrong map cannot pass by being constant.

What is compared:

* grad-cam, at the input resolution (grad-cam's ReLU -> min-max -> cv2 bilinear resize -> min-max against
  camfn's ReLU -> bilinear resize -> min-max): ``gradcam``, ``gradcampp``, ``xgradcam``, ``layercam``,
  ``hirescam``, ``gradcam_elementwise``, and ``eigencam`` / ``eigengradcam`` *up to sign* (grad-cam has
  no sign rule: camfn's raw signed map, ``relu=False, size=None, normalize=False``, is pushed through
  :func:`camfn.postprocess.finish` as ``+raw`` and ``-raw``, and for each sample one of the two must match).
* torchcam, at the layer resolution (``size=None``; torchcam min-maxes per sample with eps 1e-8):
  ``cam``, ``gradcam``, ``xgradcam``, ``layercam``, and LayerCAM multi-layer fusion
  (``torchcam.methods.LayerCAM.fuse_cams`` against :func:`camfn.fuse`). torchcam's ``GradCAMpp`` and
  ``SmoothGradCAMpp`` are wrong (GUIDE.md) and are not compared.

Conventions of the references that the comparisons have to account for (documented where they are used):

* torchcam's ``CAM`` applies no ReLU (only its docstring does): compared with ``camfn.cam(relu=False)``.
* torchcam's ``fuse_cams`` returns ``max_l resize(tanh(2 L_l))`` without a final min-max (its maximum is at
  most ``tanh(2) ~ 0.964``); :func:`camfn.fuse` min-maxes the fused map. Compared after min-maxing
  torchcam's fused map.
* densenet121's ``features`` end in ``norm5`` and ``forward`` then applies ``F.relu(..., inplace=True)``.
  Hook-based extractors on ``features`` store a tensor that this ReLU overwrites, so torchcam sees the
  post-ReLU activation *and* gradient (camfn's node ``"relu"``), while grad-cam sees the post-ReLU
  activation with the *pre*-ReLU gradient (its tensor hook was registered before the in-place op), a
  hybrid no single graph node reproduces. grad-cam is therefore compared on ``features.denseblock4``
  (whose output nothing overwrites), torchcam on ``features`` against camfn's ``"relu"``.

Hooks: camfn refuses models carrying foreign hooks by default, so every reference runs as a context
manager (its hooks are removed on exit) and camfn runs afterwards; the tests also check that the
references leave the model in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torchvision
from pytorch_grad_cam import (
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn
from torchcam import methods as tc

import camfn
from camfn.hooks import foreign_hooks
from camfn.postprocess import finish, normalize

ATOL = 1e-4
"""Maximum absolute difference allowed between two maps in [0, 1]."""
MIN_SPAN = 0.5
"""Every reference map must span at least this much per sample (it is not flat)."""
SIZE = 112


@dataclass(frozen=True)
class Arch:
    """Where to explain each model: ``(reference module path, camfn layer name)`` pairs."""

    gradcam: tuple[str, str]
    torchcam: tuple[str, str]
    fuse: tuple[tuple[str, str], tuple[str, str]]  # (shallow, deep) for LayerCAM fusion with torchcam
    fc: str | None  # classifier right after global pooling (CAM), None when the model has none
    seed: int


ARCHS = {
    "resnet18": Arch(("layer4", "layer4"), ("layer4", "layer4"), (("layer3", "layer3"), ("layer4", "layer4")), "fc", 1),
    "vgg11_bn": Arch(
        ("features.27", "features.27"),  # last ReLU, before the last max-pool
        ("features.27", "features.27"),
        (("features.20", "features.20"), ("features.27", "features.27")),
        None,  # pooling to 7x7 and three linear layers: no CAM
        2,
    ),
    "mobilenet_v3_small": Arch(
        ("features.12", "features.12"),
        ("features.12", "features.12"),
        (("features.8", "features.8"), ("features.12", "features.12")),
        None,  # two linear layers after pooling: no CAM
        3,
    ),
    "densenet121": Arch(
        ("features.denseblock4", "features.denseblock4"),  # see the module docstring
        ("features", "relu"),
        (("features.denseblock3", "features.denseblock3"), ("features", "relu")),
        "classifier",
        4,
    ),
}


@dataclass
class Setup:
    model: nn.Module
    params: dict[str, Tensor]
    x: Tensor
    target: Tensor  # (B,) distinct classes


def _build(name: str) -> Setup:
    arch = ARCHS[name]
    torch.manual_seed(arch.seed)
    model = getattr(torchvision.models, name)(weights=None).double()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = None  # cumulative average over the warm-up batches
        model.train()
        for _ in range(2):  # statistics from 8 images at 64 px: cheap, and still far from 0 / 1
            model(torch.randn(4, 3, 64, 64, dtype=torch.float64))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.eval()
    # The statistics really are non-trivial (not the initial zeros / ones).
    for bn in bns:
        assert bn.running_mean.abs().max() > 1e-3
        assert (bn.running_var - 1).abs().max() > 1e-2
    # The references need gradients at the layer only: a frozen model and an input that requires grad
    # spare grad-cam's loss.backward() the parameter gradients (vgg11_bn's classifier alone holds 120M).
    model.requires_grad_(False)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    return Setup(model, camfn.params(model), x, _targets(model, x))


def _targets(model: nn.Module, x: Tensor) -> Tensor:
    """A different class per sample: each sample's highest-scoring class not already taken.

    High logits mean positive evidence, so Grad-CAM-type maps are not all clipped to zero by the ReLU
    (a fixed class list gave an all-zero reference for one densenet121 sample): the flatness check below
    then guards the tests instead of the choice of classes.
    """
    with torch.no_grad():
        logits = model(x).clone()
    chosen: list[int] = []
    for row in logits:
        row[chosen] = -torch.inf
        chosen.append(int(row.argmax()))
    return torch.tensor(chosen)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread per process: under ``pytest -n 2`` on 2 cores, 2 OpenMP threads per worker
    oversubscribe the CPU and a forward pass in float64 went from 0.05 s to 30 s. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def zoo() -> Callable[[str], Setup]:
    """Each model is built once per module (per xdist worker), on first use."""
    cache: dict[str, Setup] = {}

    def get(name: str) -> Setup:
        if name not in cache:
            cache[name] = _build(name)
        return cache[name]

    return get


def _after_reference(model: nn.Module) -> None:
    """The reference left no hooks behind and did not switch any module to train mode."""
    assert all(p.grad is None for p in model.parameters())
    assert not foreign_hooks(model), foreign_hooks(model)
    training = [n for n, m in model.named_modules() if m.training]
    assert not training, f"reference left modules in train mode: {training[:5]}"


def _check_reference(ref: Tensor) -> None:
    assert torch.isfinite(ref).all()
    span = ref.flatten(1).amax(1) - ref.flatten(1).amin(1)
    assert (span > MIN_SPAN).all(), f"reference map is flat: span per sample {span.tolist()}"


def _diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------------------------------------ grad-cam
GRADCAM_METHODS = {
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "gradcam_elementwise": GradCAMElementWise,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
}
SIGNLESS = {"eigencam", "eigengradcam"}


def _gradcam_reference(cls: type, model: nn.Module, layer: str, x: Tensor, target: Tensor) -> Tensor:
    with cls(model, [model.get_submodule(layer)]) as extractor:
        out = extractor(x.detach().requires_grad_(), [ClassifierOutputTarget(int(c)) for c in target])
    _after_reference(model)
    return torch.from_numpy(out).double()


@pytest.mark.parametrize("method", list(GRADCAM_METHODS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradcam_parity(zoo, arch: str, method: str, record_property) -> None:
    s = zoo(arch)
    ref_layer, layer = ARCHS[arch].gradcam
    ref = _gradcam_reference(GRADCAM_METHODS[method], s.model, ref_layer, s.x, s.target)
    _check_reference(ref)
    fn = camfn.METHODS[method]
    if method in SIGNLESS:
        raw = fn(s.model, s.params, s.x, layer, s.target, relu=False, size=None, normalize=False)
        maps = camfn_default = fn(s.model, s.params, s.x, layer, s.target)
        # The sign of a principal component is arbitrary and chosen per sample: match each sample's sign.
        pos, neg = finish(raw, s.x), finish(-raw, s.x)
        per_sample = [min(_diff(pos[b], ref[b]), _diff(neg[b], ref[b])) for b in range(len(ref))]
        signs = [1 if _diff(pos[b], ref[b]) <= _diff(neg[b], ref[b]) else -1 for b in range(len(ref))]
        diff = max(per_sample)
        record_property("signs", signs)
        # The default output is the raw signed map (camfn's sign rule applied) post-processed.
        assert _diff(camfn_default, pos) <= 1e-12
    else:
        maps = fn(s.model, s.params, s.x, layer, s.target)
        diff = _diff(maps, ref)
    record_property("max_abs_diff", diff)
    assert maps.shape == (2, SIZE, SIZE)
    assert diff <= ATOL, f"{method} on {arch}: max |camfn - grad-cam| = {diff:.3g}"


# ------------------------------------------------------------------------------------------------ torchcam
TORCHCAM_METHODS = {"cam": tc.CAM, "gradcam": tc.GradCAM, "xgradcam": tc.XGradCAM, "layercam": tc.LayerCAM}
TORCHCAM_CASES = [
    (arch, method) for arch in ARCHS for method in TORCHCAM_METHODS if method != "cam" or ARCHS[arch].fc is not None
]


def _torchcam_reference(method: str, s: Setup, layer: str | list[str], fc: str | None):
    model, x = s.model, s.x
    kwargs = {"fc_layer": fc} if method == "cam" else {}
    with TORCHCAM_METHODS[method](model, layer, input_shape=tuple(x.shape[1:]), **kwargs) as extractor:
        scores = model(x.detach().requires_grad_())
        cams = extractor(class_idx=s.target.tolist(), scores=scores)
        fused = extractor.fuse_cams(cams) if isinstance(layer, list) else None
    _after_reference(model)
    return cams, fused


@pytest.mark.parametrize(("arch", "method"), TORCHCAM_CASES)
def test_torchcam_parity(zoo, arch: str, method: str, record_property) -> None:
    s = zoo(arch)
    spec = ARCHS[arch]
    ref_layer, layer = spec.torchcam
    (ref,), _ = _torchcam_reference(method, s, ref_layer, spec.fc)
    ref = ref.detach()
    _check_reference(ref)
    if method == "cam":
        # torchcam's CAM never applies the ReLU of its docstring formula; camfn's relu is an option.
        maps = camfn.cam(s.model, s.params, s.x, layer, s.target, size=None, relu=False)
    else:
        maps = camfn.METHODS[method](s.model, s.params, s.x, layer, s.target, size=None)
    diff = _diff(maps, ref)
    record_property("max_abs_diff", diff)
    assert diff <= ATOL, f"{method} on {arch}: max |camfn - torchcam| = {diff:.3g}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_torchcam_layercam_fusion(zoo, arch: str, record_property) -> None:
    s = zoo(arch)
    (ref_shallow, shallow), (ref_deep, deep) = ARCHS[arch].fuse
    cams, fused = _torchcam_reference("layercam", s, [ref_shallow, ref_deep], None)
    cams = [c.detach() for c in cams]
    fused = fused.detach()
    maps = camfn.layercam(s.model, s.params, s.x, [shallow, deep], s.target, size=None)
    assert isinstance(maps, list)
    assert len(maps) == 2
    assert maps[0].shape[-1] > maps[1].shape[-1]  # two different resolutions really are fused
    for m, c in zip(maps, cams, strict=True):
        _check_reference(c)
        assert _diff(m, c) <= ATOL
    # Convention difference: torchcam does not min-max the fused map (its maximum is <= tanh(2)).
    assert float(fused.max()) <= float(torch.tanh(torch.tensor(2.0))) + 1e-6
    ref = normalize(fused)
    _check_reference(ref)
    out = camfn.fuse(maps)
    diff = _diff(out, ref)
    record_property("max_abs_diff", diff)
    assert out.shape == ref.shape == maps[0].shape
    assert diff <= ATOL, f"fusion on {arch}: max |camfn.fuse - minmax(torchcam fuse_cams)| = {diff:.3g}"

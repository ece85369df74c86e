"""Targets (:mod:`camfn.targets`) and the ``output`` selector option.

Each target is checked in closed form on hand-written outputs, under ``vmap``, and on a model that
produces its kind of output:

* class targets (``probability``, ``contrastive``) and ``similarity`` on a tiny GAP network: HiResCAM's
  raw map is linear in ``G = dS/dA``, so for any target ``raw_S = sum_j (dS/dy_j) raw_j`` with ``raw_j`` the
  raw maps of the single outputs ``y_j`` (one ``(B, C)`` call) and ``dS/dy`` written out by hand
  (tolerance 1e-10 in float64);
* ``segmentation`` on torchvision's ``fcn_resnet50`` (random weights, 3 classes, 64 px, dict output,
  ``output="out"``) against grad-cam's ``SemanticSegmentationTarget`` through a wrapper returning
  ``["out"]`` (maps in [0, 1], max abs difference <= 1e-4 as in test_parity);
* ``detection`` on real ``fasterrcnn_mobilenet_v3_large_320_fpn`` outputs (random weights, 3 classes,
  128 px): values, and that the score is differentiable w.r.t. the backbone features. The end-to-end map
  needs the ``(head, tail)`` escape hatch (detection models are not fx-traceable) and is tested there.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torchvision
from conftest import GapNet, image, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import vmap

import camfn
from camfn.errors import OptionError, TargetError
from camfn.targets import contrastive, detection, logit, pick, probability, segmentation, similarity

RAW: dict = {"relu": False, "normalize": False, "size": None}
C = 5


# ------------------------------------------------------------------------------------ closed forms
def test_probability_is_the_softmax_entry() -> None:
    y = torch.randn(4, C, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.tensor([0, 3, 1, 4])
    assert torch.allclose(probability(c)(y), y.softmax(1)[torch.arange(4), c])
    assert torch.allclose(probability()(y), y.softmax(1).amax(1))


def test_contrastive_subtracts_the_mean_of_the_other_classes() -> None:
    y = torch.tensor([[5.0, 1.0, 4.0, 3.0], [0.0, 2.0, 7.0, 6.0]])
    assert contrastive(0, k=2)(y).tolist() == [5 - 3.5, 0 - 6.5]  # nearest: {2, 3} and {2, 3}
    assert contrastive(None, k=1)(y).tolist() == [5 - 4, 7 - 6]  # top-1 against the runner-up
    assert contrastive(1, torch.tensor([[0], [3]]), gamma=0.5)(y).tolist() == [1 - 2.5, 2 - 3]
    assert torch.equal(contrastive(2, [1, 3], gamma=0.0)(y), logit(2)(y))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=6, max_size=6),
    st.integers(0, 5),
    st.floats(0, 2, allow_nan=False),
)
def test_contrastive_k1_is_the_margin_over_the_strongest_rival(values: list[float], c: int, gamma: float) -> None:
    y = torch.tensor([values], dtype=torch.float64)
    rival = torch.cat([y[0, :c], y[0, c + 1 :]]).max()
    assert torch.allclose(contrastive(c, gamma=gamma)(y), y[:, c] - gamma * rival)


def test_segmentation_sums_class_logits_over_the_mask() -> None:
    y = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    argmax = y.argmax(1) == 2
    assert torch.allclose(segmentation(2)(y), (y[:, 2] * argmax).sum((1, 2)))
    mask = torch.zeros(4, 5)
    mask[1:3, 2:] = 1
    assert torch.allclose(
        segmentation(torch.tensor([0, 1]), mask)(y), torch.stack([y[0, 0], y[1, 1]]).mul(mask).sum((1, 2))
    )
    with pytest.raises(TargetError, match="output='out'"):
        segmentation(0)(torch.zeros(2, 3))
    with pytest.raises(TargetError, match="spatial size"):
        segmentation(0, torch.ones(3, 3))(y)


def test_similarity_is_the_cosine() -> None:
    e = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert torch.allclose(similarity(torch.tensor([4.0, 3.0]))(e), torch.tensor([24 / 25, 0.8]))
    assert torch.allclose(similarity(-e)(e), -torch.ones(2))
    with pytest.raises(TargetError, match="3 features"):
        similarity(torch.ones(3))(e)


def _found(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "scores": torch.tensor(scores)}


def test_detection_matches_by_label_and_best_iou() -> None:
    found = [
        _found([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], [1, 1, 2], [0.2, 0.7, 0.4]),
        _found([], [], []) | {"boxes": torch.zeros(0, 4)},
    ]
    ref, lab = torch.tensor([[1.0, 0, 11, 10], [50, 50, 60, 60], [50, 50, 60, 60]]), torch.tensor([1, 2, 1])
    # ref 0 overlaps both label-1 boxes, the second exactly; ref 1 matches; ref 2 has the wrong label
    assert torch.allclose(detection(ref, lab)(found), torch.tensor([0.7 + 0.4, 0.0]))
    assert torch.allclose(detection(ref[:1], lab[:1], iou=0.99)(found[:1]), torch.tensor([0.7]))
    far = torch.tensor([[5.0, 5, 15, 15]])  # IoU 25/175 with the first box
    assert detection(far, torch.tensor([1]))(found[:1]).item() == 0
    assert torch.allclose(detection(far, torch.tensor([1]), iou=0.1)(found[:1]), torch.tensor([0.7]))
    per_image = detection([ref[:1], ref[:1]], [lab[:1], lab[:1]])
    assert torch.allclose(per_image([found[0], found[0]]), torch.tensor([0.7, 0.7]))
    with pytest.raises(TargetError, match="list of dicts"):
        detection(ref, lab)(torch.zeros(2, 3))


def test_tensor_targets_are_vmap_safe() -> None:
    y = torch.randn(3, 4, C, generator=torch.Generator().manual_seed(2))  # 3 stacked (B=4, C) outputs
    c = torch.tensor([0, 1, 2, 3])
    maps = torch.randn(3, 4, C, 6, 6, generator=torch.Generator().manual_seed(3))
    for fn, data in [
        (probability(c), y),
        (contrastive(c, k=2), y),
        (contrastive(None, torch.tensor([[1], [2], [3], [4]])), y),
        (similarity(torch.arange(C, dtype=torch.float32)), y),
        (segmentation(c), maps),
        (segmentation(2, torch.ones(6, 6)), maps),
    ]:
        assert torch.allclose(vmap(fn)(data), torch.stack([fn(d) for d in data]))


def test_pick_selects_and_explains_mistakes() -> None:
    class Out:
        logits = torch.ones(1, 2)

    assert pick(Out(), "logits") is Out.logits
    assert pick((1, 2), 1) == 2
    assert pick({"a": 3}, lambda o: o["a"] + 1) == 4
    with pytest.raises(OptionError, match=r"keys \['out', 'aux'\]"):
        pick({"out": 0, "aux": 1}, "logit")
    with pytest.raises(OptionError, match="of 2 items"):
        pick((1, 2), 2)
    with pytest.raises(OptionError, match="without that attribute"):
        pick(Out(), "scores")


# --------------------------------------------------------------------- on models, with output=...
class Wrapped(nn.Module):
    """GapNet whose output is a tuple, a dict or an object with ``.logits``."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor):
        y = self.net(x)
        if self.kind == "tuple":
            return (y.sum(1), y)
        if self.kind == "dict":
            return {"aux": y.sum(1), "logits": y}
        return Logits(y)


class Logits(NamedTuple):
    """An output object read by attribute (as ``output.logits``)."""

    logits: torch.Tensor


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(GapNet(classes=C, width=6)).double().eval()


@pytest.mark.parametrize(("kind", "output"), [("tuple", 1), ("dict", "logits"), ("object", "logits"), ("dict", None)])
def test_output_selector_gives_the_plain_models_maps(net: nn.Module, kind: str, output: object) -> None:
    x = image(2, 32, seed=4)
    selector = output if output is not None else (lambda o: o["logits"])
    model, p = Wrapped(net, kind), camfn.params(Wrapped(net, kind))
    plain = camfn.params(net)
    for target in (None, 3, torch.tensor([[1, 2], [0, 4]]), probability(2)):
        want = camfn.gradcam(net, plain, x, "conv2", target)
        got = camfn.gradcam(model, p, x, "net.conv2", target, output=selector)
        assert torch.allclose(got, want, atol=1e-12)
    want = camfn.gradcam(net, plain, x, "conv2", None, aug_smooth=True)
    assert torch.allclose(camfn.gradcam(model, p, x, "net.conv2", None, aug_smooth=True, output=selector), want)
    want = camfn.smooth_gradcampp(net, plain, x, "conv2", None, n=2)
    assert torch.allclose(camfn.smooth_gradcampp(model, p, x, "net.conv2", None, n=2, output=selector), want)
    want = camfn.ablationcam(net, plain, x, "conv2", 1)
    assert torch.allclose(camfn.ablationcam(model, p, x, "net.conv2", 1, output=selector), want)
    want = camfn.scorecam(net, plain, x, "conv2", None)
    assert torch.allclose(camfn.scorecam(model, p, x, "net.conv2", None, output=selector), want)


def test_output_selector_errors(net: nn.Module) -> None:
    x, model = image(1, 32), Wrapped(net, "dict")
    p = camfn.params(model)
    with pytest.raises(TargetError, match="output= option"):
        camfn.gradcam(model, p, x, "net.conv2", 1)
    with pytest.raises(OptionError, match="keys"):
        camfn.gradcam(model, p, x, "net.conv2", 1, output="out")
    with pytest.raises(TargetError, match=f"out of range: the model has {C} outputs"):  # checked on the selection
        camfn.gradcam(model, p, x, "net.conv2", C, output="logits")
    with pytest.raises(TargetError, match="out of range"):
        camfn.gradcam(Wrapped(net, "object"), p, x, "net.conv2", torch.tensor([C + 2]), output="logits")


def _linear_in_g(net: nn.Module, x: torch.Tensor, target, grad_s) -> None:
    """HiResCAM's raw map for ``target`` equals ``sum_j dS/dy_j raw_j`` (checks the target's gradient)."""
    p = camfn.params(net)
    y = camfn.apply(net, p, x)
    every = torch.arange(y.shape[1]).expand(x.shape[0], -1)
    per_output = camfn.hirescam(net, p, x, "conv2", every, **RAW)  # (B, C, h, w)
    want = torch.einsum("bc,bchw->bhw", grad_s(y), per_output)
    got = camfn.hirescam(net, p, x, "conv2", target, **RAW)
    scale = want.abs().max()
    assert scale > 0
    assert (got - want).abs().max() <= 1e-9 * scale


def test_probability_contrastive_similarity_gradients_on_a_classifier(net: nn.Module) -> None:
    x, c = image(3, 32, seed=5), torch.tensor([0, 2, 4])
    onehot = torch.eye(C, dtype=torch.float64)[c]

    def dprob(y: torch.Tensor) -> torch.Tensor:
        s = y.softmax(1)
        pc = s.gather(1, c[:, None])
        return pc * (onehot - s)

    _linear_in_g(net, x, probability(c), dprob)
    others = torch.tensor([[1, 3], [0, 1], [2, 3]])
    mean_others = torch.eye(C, dtype=torch.float64)[others].mean(1)
    _linear_in_g(net, x, contrastive(c, others, gamma=0.7), lambda y: onehot - 0.7 * mean_others)

    def dnearest(y: torch.Tensor) -> torch.Tensor:
        rest = y.masked_fill(onehot.bool(), -torch.inf)
        return onehot - torch.eye(C, dtype=torch.float64)[rest.topk(2, 1).indices].mean(1)

    _linear_in_g(net, x, contrastive(c, k=2), dnearest)
    ref = torch.randn(C, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def dcos(y: torch.Tensor) -> torch.Tensor:
        ny, nr = y.norm(dim=1, keepdim=True), ref.norm()
        cos = (y @ ref)[:, None] / (ny * nr)
        return ref / (ny * nr) - cos * y / ny**2

    _linear_in_g(net, x, similarity(ref), dcos)


# ------------------------------------------------------------------------------------ segmentation
def test_segmentation_on_fcn_matches_grad_cam() -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    torch.manual_seed(0)
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
    model = randomize_bn(model).double().eval().requires_grad_(False)
    x = image(2, 64, seed=7)
    out = camfn.apply(model, camfn.params(model), x)["out"]
    c = int(out.argmax(1).flatten().mode().values)  # the class most pixels take
    ours = camfn.gradcam(model, camfn.params(model), x, "backbone.layer4", segmentation(c), output="out")

    class Out(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x)["out"]

    wrapper = Out(model)
    targets = [SemanticSegmentationTarget(c, (out[b].argmax(0) == c).double().numpy()) for b in range(2)]
    with GradCAM(wrapper, [model.backbone.layer4]) as reference:
        ref = torch.from_numpy(reference(x.detach().requires_grad_(), targets))
    assert (ref.flatten(1).amax(1) - ref.flatten(1).amin(1)).min() > 0.5
    assert (ours - ref).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def detector() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, box_score_thresh=0.0, min_size=128, max_size=128
    ).eval()


def test_detection_target_on_fasterrcnn_outputs(detector: nn.Module) -> None:
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(s)) for s in (8, 9)]
    # run the parts of the detector by hand so the backbone features are a leaf we can differentiate by
    batch, _ = detector.transform(images)
    features = {k: v.detach().requires_grad_() for k, v in detector.backbone(batch.tensors).items()}
    proposals, _ = detector.rpn(batch, features)
    found, _ = detector.roi_heads(features, proposals, batch.image_sizes)
    found = detector.transform.postprocess(found, batch.image_sizes, [(96, 128), (96, 128)])
    assert all(len(f["boxes"]) >= 3 for f in found)
    boxes = [f["boxes"][:3].detach() for f in found]
    labels = [f["labels"][:3] for f in found]
    score = detection(boxes, labels)(found)
    assert torch.allclose(score, torch.stack([f["scores"][:3].sum() for f in found]))
    unknown = [torch.full_like(lab, 7) for lab in labels]  # no box has this label
    assert torch.equal(detection(boxes, unknown)(found), torch.zeros(2))
    away = [b + 1000 for b in boxes]  # no overlap
    assert torch.equal(detection(away, labels)(found), torch.zeros(2))
    grads = torch.autograd.grad(score.sum(), list(features.values()), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


# ---------------------------------------------------------------------------------------------- best_query
def test_best_query_closed_form_and_bad_inputs():
    """DETR-style logits (B, Q, C + 1): None = max over queries and real classes (the last column, "no object",
    never counts); c = class c's best query, per sample for tensors; bad shapes and classes are TargetErrors."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4, dtype=torch.float64)
    logits[:, :, -1] = 100.0  # "no object" is the largest everywhere and must be ignored
    best = camfn.targets.best_query()(logits)
    torch.testing.assert_close(best, torch.stack([logits[b, :, :3].max() for b in range(3)]), rtol=0, atol=0)
    c = torch.tensor([2, 0, 1])
    per = camfn.targets.best_query(c)(logits)
    torch.testing.assert_close(per, torch.stack([logits[b, :, c[b]].max() for b in range(3)]), rtol=0, atol=0)
    two = camfn.targets.best_query(torch.tensor([[0, 1]] * 3))(logits)
    assert two.shape == (3, 2)
    torch.testing.assert_close(two[:, 1], camfn.targets.best_query(1)(logits), rtol=0, atol=0)
    with pytest.raises(camfn.errors.TargetError, match="out of range"):
        camfn.targets.best_query(3)(logits)  # class 3 is "no object": not a real class
    with pytest.raises(camfn.errors.TargetError, match=r"queries, classes \+ 1"):
        camfn.targets.best_query(0)(logits[:, 0])

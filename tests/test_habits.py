"""Habits people bring from pytorch-grad-cam 1.5.7 and torchcam 0.5, re-expressed with camfn.

Models: tiny hand-built CNNs and torchvision ``squeezenet1_1`` with random weights, in float64.

Tolerances (maps in ``[0, 1]``, maximum absolute difference):

* grad-cam: ``GC_ATOL = 1e-5``. grad-cam rounds its maps to float32 and resizes with cv2 (bilinear, the same
  convention as ``F.interpolate(align_corners=False)``), so float32 rounding bounds the agreement.
* torchcam at the layer resolution: ``TC_ATOL = 1e-6`` (torchcam min-maxes with eps 1e-8; both in float64).
* camfn against camfn (the same computation reached two ways): ``EXACT = 1e-12``.

Every reference map must span at least 0.5 per map, so a flat map cannot pass.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    FasterRCNNBoxScoreTarget,
    SemanticSegmentationTarget,
)
from torch import Tensor, nn
from torchcam.methods import CAM

import camfn
from camfn import targets
from camfn.errors import InputError, LayerError, OptionError, TargetError
from camfn.prediction import load_bundle

GC_ATOL = 1e-5
TC_ATOL = 1e-6
EXACT = 1e-12
MIN_SPAN = 0.5
SIZE = 64


class Net(nn.Module):
    """conv -> relu -> conv -> relu -> global average pool -> linear (``classes`` outputs)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.act(self.conv2(self.relu(self.conv1(x))))).flatten(1))


class SegNet(nn.Module):
    """conv -> relu -> conv 1x1: per-pixel scores ``(B, 3, H/2, W/2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(self.conv1(x)))


class ConvHead(nn.Module):
    """conv -> relu -> conv 1x1 (classifier) -> [ReLU] -> global average pool -> flatten (squeezenet-style)."""

    def __init__(self, relu: bool, kernel: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.classifier = nn.Conv2d(6, 5, kernel, padding=kernel // 2)
        self.head_relu = nn.ReLU() if relu else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.head_relu(self.classifier(self.drop(self.act(self.conv(x)))))
        return torch.flatten(self.pool(y), 1)


def _f64(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    return model.double().eval()


def _span(m: np.ndarray | Tensor) -> None:
    flat = torch.as_tensor(m).reshape(-1, m.shape[-2] * m.shape[-1])
    assert bool(((flat.max(1).values - flat.min(1).values) >= MIN_SPAN).all()), "reference map is flat"


def _gradcam_reference(model: nn.Module, layer: nn.Module, x: Tensor, gc_targets: list) -> np.ndarray:
    with GradCAM(model=model, target_layers=[layer]) as method:
        maps = method(input_tensor=x, targets=gc_targets)
    _span(maps)
    return maps


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return _f64(Net(5), 0)


@pytest.fixture(scope="module")
def x() -> Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)


# ---------------------------------------------------------------------------- per-sample target lists
@pytest.mark.parametrize(
    ("gc", "mine"),
    [
        ([ClassifierOutputTarget(3), ClassifierOutputTarget(1)], torch.tensor([3, 1])),
        (
            [ClassifierOutputSoftmaxTarget(2), ClassifierOutputSoftmaxTarget(4)],
            targets.probability(torch.tensor([2, 4])),
        ),
    ],
    ids=["ClassifierOutputTarget", "ClassifierOutputSoftmaxTarget"],
)
def test_gradcam_target_lists_match_gradcam(net: nn.Module, x: Tensor, gc: list, mine: object) -> None:
    reference = _gradcam_reference(net, net.act, x, gc)
    got = camfn.gradcam(net, camfn.params(net), x, "act", gc)  # grad-cam's own list, as it is
    assert got.shape == (2, SIZE, SIZE)
    assert np.abs(got.numpy() - reference).max() < GC_ATOL
    same = camfn.gradcam(net, camfn.params(net), x, "act", mine)  # camfn's own target for the same score
    assert (got - same).abs().max() < EXACT


def test_one_gradcam_target_object_applies_to_every_sample(net: nn.Module, x: Tensor) -> None:
    """A grad-cam target object alone is called per sample (grad-cam's objects index one sample's output)."""
    p = camfn.params(net)
    alone = camfn.gradcam(net, p, x, "act", ClassifierOutputSoftmaxTarget(2))
    listed = camfn.gradcam(net, p, x, "act", [ClassifierOutputSoftmaxTarget(2)] * 2)
    reference = _gradcam_reference(net, net.act, x, [ClassifierOutputSoftmaxTarget(2)] * 2)
    assert (alone - listed).abs().max() < EXACT
    assert np.abs(alone.numpy() - reference).max() < GC_ATOL


def test_plain_lambdas_per_sample(net: nn.Module, x: Tensor) -> None:
    """Any callables work; each gets ``output[b]`` (a ``(C,)`` vector), scores are as a closed form."""
    y = net(x).detach()
    fn = targets.scores([lambda o: o[0] - o[1], lambda o: 2 * o[4]], 2, 5)
    assert torch.allclose(fn(y), torch.stack([y[0, 0] - y[0, 1], 2 * y[1, 4]]), rtol=0, atol=EXACT)
    maps = camfn.gradcam(net, camfn.params(net), x, "act", [lambda o: o[3], lambda o: o[1]])
    assert (maps - camfn.gradcam(net, camfn.params(net), x, "act", torch.tensor([3, 1]))).abs().max() < EXACT


def test_binary_classifier_target_matches_gradcam(x: Tensor) -> None:
    model = _f64(Net(1), 2)
    p = camfn.params(model)
    for c in (0, 1):
        reference = _gradcam_reference(model, model.act, x, [BinaryClassifierOutputTarget(c)] * 2)
        listed = camfn.gradcam(model, p, x, "act", [BinaryClassifierOutputTarget(c)] * 2)
        mine = camfn.gradcam(model, p, x, "act", targets.binary(c))
        assert np.abs(mine.numpy() - reference).max() < GC_ATOL
        assert (listed - mine).abs().max() < EXACT
    y = torch.tensor([[1.5], [-2.0]], dtype=torch.float64)
    assert targets.binary(0)(y).tolist() == [-1.5, 2.0] and targets.binary(1)(y).tolist() == [1.5, -2.0]
    with pytest.raises(TargetError, match="0 or 1"):
        targets.binary(2)
    with pytest.raises(TargetError, match=r"\(B, 1\)"):
        targets.binary(1)(torch.zeros(2, 3))


def test_segmentation_target_matches_gradcam(x: Tensor) -> None:
    model = _f64(SegNet(), 3)
    mask = np.zeros((SIZE // 2, SIZE // 2))
    mask[4:20, 8:28] = 1.0
    gc = [SemanticSegmentationTarget(1, mask), SemanticSegmentationTarget(2, mask)]
    reference = _gradcam_reference(model, model.relu, x, gc)
    got = camfn.gradcam(model, camfn.params(model), x, "relu", gc)
    mine = camfn.gradcam(
        model, camfn.params(model), x, "relu", targets.segmentation(torch.tensor([1, 2]), torch.tensor(mask))
    )
    assert np.abs(got.numpy() - reference).max() < GC_ATOL
    assert (got - mine).abs().max() < EXACT


def test_target_list_errors(net: nn.Module, x: Tensor) -> None:
    p = camfn.params(net)
    with pytest.raises(TargetError, match=r"1 callable.*2 sample"):  # grad-cam: a silent zero map for sample 1
        camfn.gradcam(net, p, x, "act", [ClassifierOutputTarget(3)])
    with pytest.raises(TargetError, match="one score"):
        camfn.gradcam(net, p, x, "act", [lambda o: o[:2]] * 2)
    with pytest.raises(TargetError, match="class indices"):
        camfn.cam(net, p, x, "act", [ClassifierOutputTarget(3)] * 2)
    with pytest.raises(TargetError, match="class indices"):
        targets.classes([ClassifierOutputTarget(3)] * 2, 2, 5)
    with pytest.raises(TargetError, match="output="):  # a dict output: per-sample targets need the batched part
        targets.per_sample([ClassifierOutputTarget(3)] * 2)({"out": torch.zeros(2, 5)})
    picked = targets.scores([ClassifierOutputTarget(3)] * 2, 2, None, output="out")({"out": torch.eye(5)[:2] + 1})
    assert picked.tolist() == [1.0, 1.0]
    assert isinstance(TargetError("x"), ValueError)


def test_target_lists_in_perturbation_methods_and_aug_smooth(net: nn.Module, x: Tensor) -> None:
    """The list is applied inside ``vmap`` over perturbed copies, and repeated for each aug_smooth variant."""
    p, listed, index = camfn.params(net), [ClassifierOutputTarget(3), ClassifierOutputTarget(0)], torch.tensor([3, 0])
    got = camfn.scorecam(net, p, x, "act", listed, chunk_size=4)
    assert (got - camfn.scorecam(net, p, x, "act", index, chunk_size=4)).abs().max() < EXACT
    smooth = camfn.gradcam(net, p, x, "act", listed, aug_smooth=True)
    assert (smooth - camfn.gradcam(net, p, x, "act", index, aug_smooth=True)).abs().max() < EXACT


def test_metrics_take_target_lists_on_raw_outputs(net: nn.Module, x: Tensor) -> None:
    """A list of grad-cam targets is a callable target for metrics too: it reads raw logits (no softmax)."""
    from camfn.metrics.common import scorer

    p = camfn.params(net)
    listed = scorer(net, p, x, [ClassifierOutputTarget(3), ClassifierOutputTarget(0)], softmax=True)
    logits = scorer(net, p, x, torch.tensor([3, 0]), softmax=False)
    assert torch.allclose(listed.score(x[None]), logits.score(x[None]), rtol=0, atol=EXACT)
    assert torch.allclose(listed.clean, net(x).detach()[[0, 1], [3, 0]], rtol=0, atol=EXACT)


# ---------------------------------------------------------------------------------- detection target
def _detections(seed: int) -> list[dict[str, Tensor]]:
    torch.manual_seed(seed)
    corner = torch.rand(6, 2, dtype=torch.float64) * 40
    boxes = torch.cat([corner, corner + 10 + torch.rand(6, 2, dtype=torch.float64) * 20], 1).requires_grad_()
    scores = torch.rand(6, dtype=torch.float64).requires_grad_()
    return [{"boxes": boxes, "labels": torch.tensor([1, 2, 1, 3, 2, 1]), "scores": scores}]


def _value(t: Tensor) -> float:
    return float(t.detach().sum())


def test_iou_plus_score_matches_faster_rcnn_box_score_target() -> None:
    found = _detections(4)
    ref_boxes = found[0]["boxes"].detach()[[0, 3]] + 0.5  # near boxes 0 and 3, which have the best IoU overall
    labels = torch.tensor([1, 3])
    gc = FasterRCNNBoxScoreTarget(labels, ref_boxes.numpy(), iou_threshold=0.5)
    expected = gc(found[0])
    got = targets.detection(ref_boxes, labels, score="iou+score")(found)
    assert got.shape == (1,) and abs(_value(got) - _value(expected)) < EXACT
    assert _value(expected) > 2  # both boxes matched: two scores plus two IoUs above 0.5
    g_ref = torch.autograd.grad(expected.sum(), [found[0]["boxes"], found[0]["scores"]])
    g_got = torch.autograd.grad(got.sum(), [found[0]["boxes"], found[0]["scores"]])
    assert all(torch.allclose(a, b, rtol=0, atol=EXACT) for a, b in zip(g_ref, g_got, strict=True))
    assert float(g_got[0].abs().sum()) > 0  # the IoU term is differentiable through the boxes
    listed = targets.scores([gc], 1, None)(found)  # grad-cam's target itself, on one image's dict
    assert abs(_value(listed) - _value(got)) < EXACT
    plain = targets.detection(ref_boxes, labels)(found)  # the default stays the matched scores alone
    assert abs(_value(plain) - _value(found[0]["scores"][[0, 3]])) < EXACT
    with pytest.raises(TargetError, match="iou\\+score"):
        targets.detection(ref_boxes, labels, score="iou")


def test_contrastive_caps_k_at_the_classes_there_are() -> None:
    y = torch.tensor([[3.0, 2.0, 0.0], [1.0, 5.0, 4.0]], dtype=torch.float64)
    expected = torch.tensor([3.0 - (2.0 + 0.0) / 2, 5.0 - (1.0 + 4.0) / 2], dtype=torch.float64)
    assert torch.allclose(targets.contrastive(None, k=10)(y), expected, rtol=0, atol=EXACT)


# ------------------------------------------------------------------------------ cam, 1x1-conv heads
@pytest.fixture(scope="module")
def squeezenet() -> nn.Module:
    torch.manual_seed(5)
    return torchvision.models.squeezenet1_1(num_classes=10).double().eval()


def _torchcam(model: nn.Module, layer: str, fc: str, x: Tensor, classes: list[int]) -> Tensor:
    with CAM(model, layer, fc) as extractor:
        out = model(x)
        maps = extractor(classes, out)[0]
    _span(maps)
    return maps


def test_cam_squeezenet_matches_torchcam(squeezenet: nn.Module, x: Tensor) -> None:
    reference = _torchcam(squeezenet, "features", "classifier.1", x, [3, 7])
    got = camfn.cam(squeezenet, camfn.params(squeezenet), x, "features", torch.tensor([3, 7]), relu=False, size=None)
    assert got.shape == reference.shape
    assert (got - reference).abs().max() < TC_ATOL


@pytest.mark.parametrize("relu", [False, True], ids=["no-relu", "relu"])
def test_cam_conv_head_matches_torchcam(x: Tensor, relu: bool) -> None:
    model = _f64(ConvHead(relu), 6)
    p = camfn.params(model)
    reference = _torchcam(model, "act", "classifier", x, [1, 4])
    got = camfn.cam(model, p, x, "act", torch.tensor([1, 4]), relu=False, size=None)
    assert (got - reference).abs().max() < TC_ATOL
    if not relu:  # a linear head: CAM is exact, equal to Grad-CAM (the weights are the pooled gradients)
        grad = camfn.gradcam(model, p, x, "act", torch.tensor([1, 4]), relu=False, size=None)
        assert (got - grad).abs().max() < 1e-10


def test_cam_refuses_a_non_1x1_conv_head(x: Tensor) -> None:
    model = _f64(ConvHead(False, kernel=3), 7)
    with pytest.raises(LayerError, match="1x1-convolution"):
        camfn.cam(model, camfn.params(model), x, "act", 1)
    dense = _f64(nn.Sequential(SegNet(), nn.Flatten()), 3)  # a 1x1 conv, no pooling: per-pixel outputs
    with pytest.raises(LayerError, match="1x1-convolution"):
        camfn.cam(dense, camfn.params(dense), x, "0.relu", 1)


# ------------------------------------------------------------------------------- explain_prediction
@pytest.fixture(scope="module")
def bundle(net: nn.Module, x: Tensor, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    folder = tmp_path_factory.mktemp("bundle") / "out"
    result = camfn.explain_prediction(net, x[:1], methods=("gradcam", "layercam"), top=3, out=folder)
    return result, folder


def test_explain_prediction_classes_and_maps(net: nn.Module, x: Tensor, bundle: tuple) -> None:
    result, _ = bundle
    probs = net(x[:1]).softmax(1)[0].detach()
    top = probs.topk(3)
    assert result.classes == top.indices.tolist()
    assert np.allclose(result.scores, top.values.numpy(), rtol=0, atol=EXACT)
    assert result.layer == camfn.default_layer(net, x[:1])
    classes = torch.tensor([result.classes])
    for name in ("gradcam", "layercam"):
        expected = camfn.METHODS[name](net, camfn.params(net), x[:1], result.layer, classes)[0]
        assert result.maps[name].shape == (3, SIZE, SIZE)
        assert (result.maps[name] - expected).abs().max() < EXACT
        one = camfn.METHODS[name](net, camfn.params(net), x[:1], result.layer, result.classes[1])[0]
        assert (result.maps[name][1] - one).abs().max() < EXACT  # row t explains classes[t]


def test_explain_prediction_bundle(bundle: tuple, x: Tensor) -> None:
    result, folder = bundle
    manifest, maps = load_bundle(folder)
    assert result.folder == folder
    assert manifest["versions"] == {
        "camfn": importlib.metadata.version("camfn"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    assert manifest["methods"] == ["gradcam", "layercam"]
    assert manifest["layer"] == result.layer and manifest["input_shape"] == [1, 3, SIZE, SIZE]
    assert manifest["input_dtype"] == "float64"
    assert manifest["classes"] == result.classes and manifest["scores"] == result.scores
    for name in ("gradcam", "layercam"):
        assert np.array_equal(maps[name], result.maps[name].numpy())
        pngs = manifest["files"][name]["overlays"]
        assert [p.split("class")[1] for p in pngs] == [f"{c}.png" for c in result.classes]
        for png, m in zip(pngs, result.maps[name], strict=True):
            picture = Image.open(folder / png)
            assert picture.size == (SIZE, SIZE)
            expected = camfn.viz.overlay(camfn.viz.as_image(x[0]), m.float())
            assert np.array_equal(np.asarray(picture), np.asarray(expected))
    assert not list(folder.glob("*.tmp"))  # atomic writes leave no temporary files


def test_explain_prediction_from_a_numpy_image(net: nn.Module) -> None:
    rng = np.random.default_rng(8)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    result = camfn.explain_prediction(net, image, top=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = camfn.viz.preprocess(image, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).double()
    assert result.x.dtype == torch.float64 and (result.x - x).abs().max() < EXACT
    expected = camfn.gradcam(net, camfn.params(net), x, result.layer, torch.tensor([result.classes]))[0]
    assert (result.maps["gradcam"] - expected).abs().max() < EXACT
    pil = camfn.explain_prediction(net, Image.fromarray(image), top=2, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert pil.classes == result.classes and (pil.maps["gradcam"] - result.maps["gradcam"]).abs().max() < EXACT


def test_explain_prediction_errors(net: nn.Module, x: Tensor, tmp_path) -> None:
    assert len(camfn.explain_prediction(net, x[0], top=50).classes) == 5  # top capped at the classes there are
    with pytest.raises(OptionError, match="unknown"):
        camfn.explain_prediction(net, x[:1], methods=("gradcamm",))
    with pytest.raises(OptionError, match="top"):
        camfn.explain_prediction(net, x[:1], top=0)
    with pytest.raises(InputError, match="one network input"):
        camfn.explain_prediction(net, x)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="is a file"):
        camfn.explain_prediction(net, x[:1], out=tmp_path / "file")
    with pytest.raises(InputError, match="bundle"):
        load_bundle(tmp_path / "nothing")

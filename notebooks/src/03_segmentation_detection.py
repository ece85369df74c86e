# %% [markdown]
# # Segmentation and detection targets
#
# A *target* turns the model's output into the score a map explains. For models that return dicts, lists or
# objects, the `output=` option picks the part the target reads. The models here have **random weights**
# (no downloads): the maps show how to call camfn, not what a trained model looks at.

# %%
import torch
import torchvision
from IPython.display import display

import camfn
from camfn import shapes, viz
from camfn.targets import detection, segmentation

torch.manual_seed(0)
x, _, box = shapes.demo_image()  # any (1, 3, 64, 64) image will do
picture = (x[0] * shapes.STD + shapes.MEAN).clamp(0, 1)

# %% [markdown]
# ## Semantic segmentation: `fcn_resnet50`
#
# torchvision segmentation models return `{"out": (B, C, H, W), ...}`: pass `output="out"`.
# `segmentation(c)` sums class `c`'s logits over the pixels where `c` is the arg-max class;
# `segmentation(c, mask)` sums them over a region you choose (here the demo object's box).

# %%
segmenter = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
segmenter.eval()
seg_params = camfn.params(segmenter)
x0, y0, x1, y1 = box.int().tolist()
region = torch.zeros(64, 64)
region[y0:y1, x0:x1] = 1

where_argmax = camfn.gradcam(segmenter, seg_params, x, "backbone.layer4", segmentation(1), output="out")
in_region = camfn.gradcam(segmenter, seg_params, x, "backbone.layer4", segmentation(1, region), output="out")
display(viz.grid([picture], {"class 1, arg-max": where_argmax, "class 1, in the box": in_region}, cell=128))

# %% [markdown]
# ## Detection: `fasterrcnn_mobilenet_v3_large_320_fpn` through `camfn.Cut`
#
# torch.fx cannot trace torchvision's detectors (data-dependent control flow in the region proposals), so
# camfn takes the model as a pair `head(x) -> A` (here the backbone up to the feature map to explain) and
# `tail(A, x) -> output` (the rest). `autograd_tail=True` differentiates the tail with plain autograd
# (`roi_align` has no `torch.func` support). `detection(boxes, labels)` scores the predicted box of that
# label with the best IoU against each reference box; here the reference is the detector's own top box.

# %%
detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
    weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128, box_score_thresh=0.0
).eval()
with torch.no_grad():
    found = detector(x)[0]
reference = detection(found["boxes"][:1], found["labels"][:1])
print(f"top box {found['boxes'][0].round().tolist()}, label {int(found['labels'][0])}")


def head(images: torch.Tensor) -> torch.Tensor:
    """Resize and normalise, then the backbone's last feature map (the layer explained)."""
    batch, _ = detector.transform(list(images))
    return detector.backbone.body(batch.tensors)["1"]


def tail(features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The rest of the detector from that feature map, scored by the detection target: (B,)."""
    batch, _ = detector.transform(list(images))
    pyramid = detector.backbone.fpn({"0": detector.backbone.body(batch.tensors)["0"], "1": features})
    proposals, _ = detector.rpn(batch, pyramid)
    return reference(detector.roi_heads(pyramid, proposals, batch.image_sizes)[0])


cut = camfn.Cut(head, tail, tail_takes_input=True, autograd_tail=True)
with torch.no_grad():  # the tail's own autograd runs inside; nothing else needs a graph
    maps = camfn.gradcam(cut, {}, x, "head", lambda score: score)  # the tail already returns the score
print(tuple(maps.shape), float(maps.max()))
display(viz.overlay(picture, maps[0], scale=3))

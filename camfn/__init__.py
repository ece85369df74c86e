"""camfn: class activation maps for PyTorch as pure functions.

Every method is ``method(model, params, x, layer, target, **options) -> maps``, built on ``torch.func``
over a torch.fx trace of the model: no hooks, no mode switches, no ``.grad``; composable with ``vmap``,
``grad`` and ``torch.compile``.

Example:
    >>> import torch, torchvision, camfn
    >>> model = torchvision.models.resnet18().eval()
    >>> maps = camfn.gradcam(model, camfn.params(model), torch.randn(2, 3, 64, 64), "layer4", 281)
    >>> maps.shape, bool(((0 <= maps) & (maps <= 1)).all())
    (torch.Size([2, 64, 64]), True)
"""

from . import errors, forward, graph, layout, metrics, noise, postprocess, shapes, smoothing, targets, viz
from .checkpoints import maps_over_params, stack_params
from .compiled import Compiled, compiled, graph_breaks
from .errors import CamfnError, HookError, InputError, LayerError, ModeError, OptionError, TargetError, TraceError
from .evaluation import evaluate
from .forward import params
from .graph import Cut, LayerInfo, default_layer, layers
from .methods import (
    METHODS,
    ablationcam,
    cam,
    eigencam,
    eigengradcam,
    gradcam,
    gradcam_elementwise,
    gradcampp,
    guided_backprop,
    guided_gradcam,
    hirescam,
    iscam,
    layercam,
    scorecam,
    smooth_gradcampp,
    sscam,
    xgradcam,
)
from .postprocess import fuse

__version__ = "0.1.0"


__all__ = [
    "METHODS",
    "CamfnError",
    "Compiled",
    "Cut",
    "HookError",
    "InputError",
    "LayerError",
    "LayerInfo",
    "ModeError",
    "OptionError",
    "TargetError",
    "TraceError",
    "ablationcam",
    "cam",
    "compiled",
    "default_layer",
    "eigencam",
    "eigengradcam",
    "errors",
    "evaluate",
    "forward",
    "fuse",
    "gradcam",
    "gradcam_elementwise",
    "gradcampp",
    "graph",
    "graph_breaks",
    "guided_backprop",
    "guided_gradcam",
    "hirescam",
    "iscam",
    "layercam",
    "layers",
    "layout",
    "maps_over_params",
    "metrics",
    "noise",
    "params",
    "postprocess",
    "scorecam",
    "shapes",
    "smooth_gradcampp",
    "smoothing",
    "sscam",
    "stack_params",
    "targets",
    "viz",
    "xgradcam",
]

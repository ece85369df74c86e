"""camfn: class activation maps for PyTorch as pure functions.

Every method is ``method(model, params, x, layer, target, **options) -> maps``, built on ``torch.func``
over a traced graph of the model (torch.fx or torch.export): no hooks, no mode switches, no ``.grad``;
composable with ``vmap``, ``grad`` and ``torch.compile``. ``model`` is an ``nn.Module`` or a plain
function ``model_fn(params, x)``.

Example:
    >>> import torch, torchvision, camfn
    >>> model = torchvision.models.resnet18().eval()
    >>> maps = camfn.gradcam(model, camfn.params(model), torch.randn(2, 3, 64, 64), "layer4", 281)
    >>> maps.shape, bool(((0 <= maps) & (maps <= 1)).all())
    (torch.Size([2, 64, 64]), True)
"""

from . import errors, hooks, layout, metrics, noise, postprocess, rewrite, shapes, targets, tracing, viz
from .checkpoints import maps_over_params, stack_params
from .compiled import Compiled, compiled, graph_breaks
from .cut import Cut
from .driver import method
from .errors import CamfnError, HookError, InputError, LayerError, ModeError, OptionError, TargetError, TraceError
from .evaluation import evaluate
from .exporting import export
from .layer_names import LayerInfo, default_layer, layers
from .methods import METHODS, dff, guided_backprop, guided_gradcam
from .postprocess import fuse
from .prediction import explain_prediction
from .tracing import apply, params

globals().update(METHODS)

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
    "apply",
    "compiled",
    "default_layer",
    "dff",
    "errors",
    "evaluate",
    "explain_prediction",
    "export",
    "fuse",
    "hooks",
    "graph_breaks",
    "guided_backprop",
    "guided_gradcam",
    "layers",
    "layout",
    "maps_over_params",
    "method",
    "metrics",
    "noise",
    "params",
    "postprocess",
    "rewrite",
    "shapes",
    "stack_params",
    "targets",
    "tracing",
    "viz",
    *METHODS,
]

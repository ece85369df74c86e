"""Methods by family: :mod:`~camfn.methods.gradient`, :mod:`~camfn.methods.activation`,
:mod:`~camfn.methods.perturbation`, :mod:`~camfn.methods.guided`."""

from .activation import cam, eigencam
from .gradient import (
    eigengradcam,
    gradcam,
    gradcam_elementwise,
    gradcampp,
    hirescam,
    layercam,
    smooth_gradcampp,
    xgradcam,
)
from .guided import guided_backprop, guided_gradcam
from .perturbation import ablationcam, iscam, scorecam, sscam

__all__ = [
    "ablationcam",
    "cam",
    "eigencam",
    "eigengradcam",
    "gradcam",
    "gradcam_elementwise",
    "gradcampp",
    "guided_backprop",
    "guided_gradcam",
    "hirescam",
    "iscam",
    "layercam",
    "scorecam",
    "smooth_gradcampp",
    "sscam",
    "xgradcam",
]

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

METHODS = {
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
    "gradcam_elementwise": gradcam_elementwise,
    "eigengradcam": eigengradcam,
    "cam": cam,
    "eigencam": eigencam,
    "smooth_gradcampp": smooth_gradcampp,
    "ablationcam": ablationcam,
    "scorecam": scorecam,
    "sscam": sscam,
    "iscam": iscam,
}
"""Every method by name."""

__all__ = [
    "METHODS",
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

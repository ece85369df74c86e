"""Methods by family: :mod:`~camfn.methods.gradient`, :mod:`~camfn.methods.activation`."""

from .activation import cam, eigencam
from .gradient import eigengradcam, gradcam, gradcam_elementwise, gradcampp, hirescam, layercam, xgradcam

__all__ = [
    "cam",
    "eigencam",
    "eigengradcam",
    "gradcam",
    "gradcam_elementwise",
    "gradcampp",
    "hirescam",
    "layercam",
    "xgradcam",
]

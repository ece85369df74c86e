"""Methods by family: :mod:`~camfn.methods.gradient`, :mod:`~camfn.methods.activation`,
:mod:`~camfn.methods.perturbation` (each method one function on :func:`camfn.driver.method`),
:mod:`~camfn.methods.composite` (methods on a base method), :mod:`~camfn.methods.attention` (LeGrad), and
:mod:`~camfn.methods.guided` (input gradients, not maps). Importing the families fills :data:`METHODS`."""

from ..driver import REGISTRY as METHODS
from . import gradient  # the registry lists the gradient family first

# isort: split
from . import activation, factorization, perturbation

# isort: split
from . import composite  # built on the families above

# isort: split
from . import attention
from .factorization import dff
from .guided import guided_backprop, guided_gradcam

globals().update(METHODS)

__all__ = [
    "METHODS",
    "activation",
    "attention",
    "composite",
    "dff",
    "factorization",
    "gradient",
    "guided_backprop",
    "guided_gradcam",
    "perturbation",
    *METHODS,
]

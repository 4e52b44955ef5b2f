"""eqzoo: learnt partial equivariance for the timm model zoo.

``import eqzoo`` registers the ``pe_*`` models with timm.
"""
from .groups import get_group
from .likelihood import GroupLikelihood
from .regularizers import likelihoods, regularization

__version__ = "0.1.0"

__all__ = ["GroupLikelihood", "get_group", "likelihoods", "regularization", "__version__"]

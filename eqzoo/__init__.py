"""eqzoo: learnt partial equivariance for the timm model zoo.

``import eqzoo`` registers the ``pe_*`` models with timm.
"""
from ._version import __version__
from .analysis import degree_of_equivariance, equivariance_error, format_table, head_invariance, kernel_invariance
from .export import export
from .groups import get_group
from .hub import load_likelihoods, push_to_hub, save_pretrained
from .likelihood import GroupLikelihood, likelihoods
from . import models  # registers the pe_* models with timm
from .regularizers import regularization
from .viz import plot_likelihoods

__all__ = ["GroupLikelihood", "get_group", "likelihoods", "regularization", "models", "export", "__version__",
           "save_pretrained", "push_to_hub", "load_likelihoods", "plot_likelihoods", "degree_of_equivariance",
           "equivariance_error", "format_table", "head_invariance", "kernel_invariance"]

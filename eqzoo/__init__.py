"""eqzoo: learnt partial equivariance for the timm model zoo.

``import eqzoo`` registers the ``pe_*`` models with timm.
"""
from .groups import get_group
from .likelihood import GroupLikelihood
from .regularizers import likelihoods, regularization
from . import models  # registers the pe_* models with timm
from .export import export

__version__ = "0.1.0"

__all__ = ["GroupLikelihood", "get_group", "likelihoods", "regularization", "models", "export", "__version__"]

# Hub, plots and equivariance analysis (issue 4)
from .hub import load_likelihoods, push_to_hub, save_pretrained
from .viz import plot_likelihoods
from .analysis import degree_of_equivariance, equivariance_error, format_table, head_invariance, kernel_invariance

__all__ += ["save_pretrained", "push_to_hub", "load_likelihoods", "plot_likelihoods", "degree_of_equivariance",
            "equivariance_error", "format_table", "head_invariance", "kernel_invariance"]

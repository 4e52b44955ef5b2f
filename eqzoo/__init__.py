"""eqzoo: learnt partial equivariance for the timm model zoo.

``import eqzoo`` registers the ``pe_*`` models with timm (and changes nothing in timm). The
method is described in :mod:`eqzoo.likelihood` (λ, the twirl, the layer's filter) and
:mod:`eqzoo.nn.twirl` (how the filter is computed).

The package::

    __init__.py       the public API below; importing it registers the models
    groups.py         group specs ("D4", "O2", "C1", ...) -> escnn gspaces, field types, grids
    likelihood.py     GroupLikelihood (λ: density, KLs, read-out) and a model's likelihoods
    kernels.py        build-time maths: kernel bases, the twirl's operators, fingerprints, the cache
    nn/               PEConv2d, PELinear, FieldBatchNorm2d, nonlinearities, pooling (plain tensors);
                      twirl/ computes a layer's filter from its weights and λ
    regularizers.py   the loss terms on the likelihoods (alignment, KL chain, KL to uniform)
    validate.py       checks and caps of the model arguments
    errors.py         every error eqzoo raises on purpose
    models/           pe_resnet.py, pe_wrn.py (the registered models) and their one build and
                      load path (pretrained, hf-hub:, local-dir:), the checks of loaded weights
                      and the saved format
    sources.py        where a model comes from: hf-hub:, local-dir:, folders, run folders, timm names
    hub/              writing, publishing and reading saved models: config, card, likelihood files
    export.py         a pe model to plain torch layers / timm's own model
    analysis.py       read-outs: degree of equivariance, equivariance error, head and kernel invariance
    viz.py            plots of λ
    data/             the data sets of the training engine and their symmetry transforms
    config.py         run configs: the keys, their defaults and checks
    train/            the training engine (``eqzoo train``): run folders, loop, checkpoints, DDP
    cli.py            the ``eqzoo`` command
    timm_script.py    runs timm's own scripts (train.py, validate.py, ...) with the models registered

Escnn is used while a layer is built (groups, representations, bases); a forward pass is plain
torch. The model code never imports :mod:`eqzoo.hub`: saving is built on the models, not the other
way round.
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

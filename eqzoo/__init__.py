"""eqzoo: learnt partial equivariance for the timm model zoo.

``import eqzoo`` registers the ``pe_*`` models with timm, as soon as timm is imported, and changes
nothing in timm; the public API below is imported on first use. The method is described in
:mod:`eqzoo.likelihood` (what λ does to a layer) and :mod:`eqzoo.nn.twirl` (the λ-twirl and how a
layer's filter is computed).

The package::

    __init__.py       the public API; registering the models
    groups.py         group specs ("D4", "O2", "C1", ...) -> escnn gspaces, field types, grids
    likelihood.py     GroupLikelihood (λ: density, KLs, read-out) and a model's likelihoods
    kernels.py        build-time maths: the kernel bases and facts about representations
    nn/               PEConv2d, PELinear (conv.py; harmonic_conv.py for small maps), FieldBatchNorm2d
                      and its synchronised form, nonlinearities, pooling: plain tensors in and out
    nn/twirl/         the λ-twirl: its reference definition, the sparse and regular-frame fast
                      paths, their Layout interface, the per-element operators and their cache
    regularizers.py   the loss terms on the likelihoods (alignment, KL chain, KL to uniform)
    validate.py       OPTIONS, the one declaration of the model options, and Spec, the check of
                      every untrusted setting (model options and run config keys alike)
    errors.py         every error eqzoo raises on purpose
    models/           pe_resnet.py, pe_wrn.py (the registered models); _common.py, _layers.py (what
                      the families share, the layer factory); _builder.py (the one build and load
                      path: pretrained, hf-hub:, local-dir:); _checkpoint.py (weights meeting a
                      model); _schema.py (the saved format); _pretrained.py, published.json (tags)
    sources.py        where a model comes from: hf-hub:, local-dir:, folders, run folders, timm names
    hub/              writing, publishing and reading saved models: config, card, likelihood files
    _export.py        eqzoo.export: a pe model to plain torch layers / timm's own model
    analysis.py       read-outs: degree of equivariance, equivariance error, head and kernel invariance
    viz.py            plots of λ
    data/             the data sets of the training engine and their symmetry transforms
    config.py         run configs: the keys, their defaults and checks
    train/            the training engine (``eqzoo train``): run folders, loop, checkpoints, DDP
    cli.py            the ``eqzoo`` command
    timm_script.py    runs timm's own scripts (train.py, validate.py, ...) with the models registered
    _timm.py          the private timm names eqzoo uses, in one place
    _io.py _yaml.py   atomic file writes; bounded YAML/JSON reading
    _buffers.py       constant buffers, rebuilt from a module's arguments and kept out of its state

escnn is used while a layer is built (groups, representations, bases); a forward pass is plain
torch. The model code never imports :mod:`eqzoo.hub`: saving is built on the models, not the other
way round.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from ._version import __version__

# The public API is imported on first use (PEP 562), so that `eqzoo --help` or a config check
# starts without torch, timm and escnn; the models are registered with timm as soon as timm is
# imported (at once when it already is).
_API = {"GroupLikelihood": "likelihood", "likelihoods": "likelihood", "get_group": "groups",
        "regularization": "regularizers", "export": "_export", "save_pretrained": "hub", "push_to_hub": "hub",
        "load_likelihoods": "hub", "plot_likelihoods": "viz", "degree_of_equivariance": "analysis",
        "equivariance_error": "analysis", "format_table": "analysis", "head_invariance": "analysis",
        "kernel_invariance": "analysis"}

__all__ = [*_API, "models", "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: eqzoo.hub, eqzoo.models, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _register_models() -> None:
    importlib.import_module(".models", __name__)  # its import registers the pe_* models


class _AfterTimm(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds timm as the other finders do, and registers the models once timm's import is done."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once, and not for its own look-up below
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register_models()


if "timm" in sys.modules:
    _register_models()
else:
    sys.meta_path.insert(0, _AfterTimm())

"""Checks of model arguments, run before any escnn or tensor work.

A model's arguments may come from a config.json downloaded from the Hub or from a YAML file, so
they are untrusted input: a group of order 10**6 or a width of 10**9 would otherwise take all the
machine's memory before anything complained. Every argument is checked for its type (strings are
never booleans, booleans never numbers) and against a cap, and the whole model's size is
estimated from its widths and depths before it is built.

:data:`RULES` holds the per-argument checks (used for config.json and training configs, where
only some keys are given); :func:`checked_args` applies them and a model family's own cross-key
check to a constructor's bound arguments.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import numbers

from .errors import ModelArgError
from .groups import Group, get_group
from .kernels import BASES

# Caps: far above the models eqzoo ships (the widest is wide_resnet101_2, 2048 channels, 127M
# weights), low enough that a model within them builds on a workstation.
MAX_GROUP_ORDER = 32        # |G| of D<N> / C<N>: D16 or C32 build in seconds; D32 took 210 s and 5 GB
MAX_FIELD_BANDLIMIT = 7     # O(2)/SO(2) fields: the Fourier ReLU's 32 (O2) / 16 (SO2) samples must
                            # represent a field of 2 + 4L (O2) / 1 + 2L (SO2) channels
MAX_BANDLIMIT = 32          # λ's band-limits
MAX_WIDTH = 8192            # channels of any layer
MAX_BLOCKS = 64             # blocks per stage (resnet200 has 36)
MAX_CLASSES = 100_000       # ImageNet-22k has 21,843
MAX_IN_CHANS = 1024
MAX_WEIGHTS = 10**9         # weights of the model's plain-convolution equivalent (its filters' size)


class _Bad(Exception):
    """Raised by a rule with the problem; :func:`check_arg` names the argument."""


def _cap_note(name: str) -> str:
    return f"eqzoo's cap {name} in eqzoo/validate.py"


NONE = type(None)


def is_json(value) -> bool:
    """Whether ``value`` is plain JSON data (what a config.json can hold)."""
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def type_ok(value, types: tuple | None) -> bool:
    """Whether ``value`` has one of the JSON ``types`` (None: any JSON value). Booleans are never
    numbers, as in JSON and YAML; a list is accepted for ``list`` or ``tuple``."""
    if types is None:
        return is_json(value)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, (list, tuple)) and (list in types or tuple in types):
        return is_json(value)
    return isinstance(value, types)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_in(v, lo: int, hi: int, cap: str | None = None, what: str = "") -> None:
    if not _is_int(v):
        raise _Bad(f"must be an int{what}, got {v!r} ({type(v).__name__})")
    if v < lo:
        raise _Bad(f"must be >= {lo}{what}, got {v}")
    if v > hi:
        raise _Bad(f"is {v}, above the maximum of {hi}" + (f" ({_cap_note(cap)})" if cap else ""))


def _int_rule(lo: int, hi: int, cap: str | None = None, what: str = "", optional: bool = False):
    def rule(v):
        if optional and v is None:
            return
        _int_in(v, lo, hi, cap, what)
    return rule


def _bool_rule(v) -> None:
    # "no", "false" and 0 are all truthy or ambiguous: only real booleans are accepted
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false (a bool), got {v!r} ({type(v).__name__})")


def _rate_rule(v) -> None:
    if not _is_number(v) or not 0 <= v <= 1 or math.isnan(v):
        raise _Bad(f"must be a number in [0, 1], got {v!r}")


def _choice_rule(choices):
    def rule(v):
        if not isinstance(v, str) or v not in choices:
            raise _Bad(f"must be one of {tuple(choices)}, got {v!r}")
    return rule


def _str_rule(optional: bool = False):
    def rule(v):
        if not (isinstance(v, str) or (optional and v is None)):
            raise _Bad(f"must be a string{' or null' if optional else ''}, got {v!r} ({type(v).__name__})")
    return rule


def _group_rule(v) -> None:
    if not isinstance(v, (str, Group)):
        raise _Bad(f"must be a group spec string such as 'D4', 'C8' or 'O2', got {v!r} ({type(v).__name__})")
    try:
        G = get_group(v)
    except ValueError as e:
        raise _Bad(f"must be a known group: {e}") from None
    if G.order > MAX_GROUP_ORDER:
        raise _Bad(f"{G.spec} has order {G.order}, above the maximum of {MAX_GROUP_ORDER} "
                   f"({_cap_note('MAX_GROUP_ORDER')}; e.g. D16, C32, or the continuous 'O2'/'SO2')")


def _int_list_rule(length: int, lo: int, hi: int, cap: str, what: str, optional: bool = False):
    def rule(v):
        if optional and v is None:
            return
        if not (isinstance(v, (list, tuple)) and len(v) == length and all(_is_int(x) and lo <= x <= hi for x in v)):
            raise _Bad(f"must be a list of {length} ints in [{lo}, {hi}] ({what}; {_cap_note(cap)}), got {v!r}")
    return rule


def _block_rule(v) -> None:
    if isinstance(v, str):
        if v not in ("basic", "bottleneck"):
            raise _Bad(f"must be 'basic', 'bottleneck' or a block class, got {v!r}")
    elif not (isinstance(v, type) and _is_int(getattr(v, "expansion", None))):
        raise _Bad(f"must be 'basic', 'bottleneck' or a block class (PEBasicBlock, PEBottleneck), got {v!r}")


def _basis_rule(v) -> None:
    if not isinstance(v, str) or v not in BASES:
        raise _Bad(f"must be one of {tuple(BASES)}, got {v!r}")


def _out_bandlimit_rule(v) -> None:
    if v is None or (_is_int(v) and v == -1):
        return  # None: no smoothing; -1: the group's default
    _int_in(v, 0, MAX_BANDLIMIT, "MAX_BANDLIMIT", " (or null, or -1 for the default)")


SHARE_MODES = ("layer", "stage", "model")
# Classifiers on the pooled fields (see eqzoo.models._layers.FieldLayers.classifier). "auto" is
# what the symmetry panel measured best: a plain linear head for learnt-λ models, an invariant one
# for strict models.
HEADS = ("auto", "plain", "learnt", "invariant")
# Nonlinearities of the band-limited O(2)/SO(2) fields (see eqzoo.nn.activation); "auto" is
# "fourier" there and the channel-wise ReLU for the regular fields of finite groups.
NONLINEARITIES = ("auto", "fourier", "norm", "gated")

# One check per argument name, the same for every pe model family that has the argument.
RULES = {
    "group": _group_rule,
    "bandlimit": _int_rule(0, MAX_BANDLIMIT, "MAX_BANDLIMIT", " (or null)", optional=True),
    "out_bandlimit": _out_bandlimit_rule,
    "field_bandlimit": _int_rule(0, MAX_FIELD_BANDLIMIT, "MAX_FIELD_BANDLIMIT", " (or null)", optional=True),
    "share_likelihood": _choice_rule(SHARE_MODES),
    "learn_likelihood": _bool_rule,
    "head": _choice_rule(HEADS),
    "basis": _basis_rule,
    "nonlinearity": _choice_rule(NONLINEARITIES),
    "num_classes": _int_rule(0, MAX_CLASSES, "MAX_CLASSES"),
    "in_chans": _int_rule(1, MAX_IN_CHANS, "MAX_IN_CHANS"),
    "global_pool": _str_rule(),
    "drop_rate": _rate_rule,
    "drop_path_rate": _rate_rule,
    "drop_block_rate": _rate_rule,
    "block_drop_rate": _rate_rule,
    "zero_init_last": _bool_rule,
    "block": _block_rule,
    "layers": _int_list_rule(4, 1, MAX_BLOCKS, "MAX_BLOCKS", "blocks per stage"),
    "channels": _int_list_rule(4, 1, MAX_WIDTH, "MAX_WIDTH", "widths", optional=True),
    "stem_width": _int_rule(1, MAX_WIDTH, "MAX_WIDTH"),
    "base_width": _int_rule(1, MAX_WIDTH, "MAX_WIDTH"),
    "depth": _int_rule(10, 6 * MAX_BLOCKS + 4, "MAX_BLOCKS", " (6n + 4)"),
    "widen_factor": _int_rule(1, MAX_WIDTH // 64, "MAX_WIDTH"),
    "counterpart": _str_rule(optional=True),
}


def check_arg(name: str, value, where: str = "") -> None:
    """Check one argument by :data:`RULES` (names without a rule pass); raises :class:`ModelArgError`."""
    rule = RULES.get(name)
    if rule is None:
        return
    try:
        rule(value)
    except _Bad as e:
        raise ModelArgError(name, str(e), where) from None


def check_args(args: dict, where: str = "") -> None:
    for name, value in args.items():
        check_arg(name, value, where)


# -- whole-model checks ---------------------------------------------------------------------------
def check_widths(group, widths) -> None:
    """Finite groups: every width must be a whole number of regular fields (|G| channels), so
    that the model has exactly the widths (and the compute) of its plain counterpart. Arithmetic
    only: no representation is built."""
    G = get_group(group)
    if not G.is_finite:
        return
    bad = sorted({int(w) for w in widths if w % G.order})
    if bad:
        g = math.gcd(*[int(w) for w in widths])
        fits = [f"{kind}{n}" for kind, per_n in (("D", 2), ("C", 1)) for n in range(1, MAX_GROUP_ORDER + 1)
                if g % (per_n * n) == 0 and per_n * n <= MAX_GROUP_ORDER]
        raise ModelArgError("group", f"{G.spec} has regular fields of {G.order} channels, which do not divide "
                                     f"the model's widths {bad}; groups whose order divides {g} fit: "
                                     f"{', '.join(fits)} (or the continuous 'O2', 'SO2', which round widths "
                                     "to whole fields)")


def check_size(n_weights: int) -> None:
    """Refuse a model whose plain-convolution equivalent has more than MAX_WEIGHTS weights."""
    if n_weights > MAX_WEIGHTS:
        raise ModelArgError("arguments", f"give a model of about {n_weights:.2g} weights (counted as plain "
                                         f"convolutions), above the maximum of {MAX_WEIGHTS:.0e} "
                                         f"({_cap_note('MAX_WEIGHTS')}); reduce the widths, depths or num_classes")


def checked_args(family_check=None):
    """Decorator for a model constructor: binds its arguments (defaults filled in), checks each
    by :data:`RULES`, then calls ``family_check(arguments)`` (cross-key checks; it may replace
    values, e.g. a block name by its class) before the constructor runs.

    The bound arguments, as given (before such replacements) and without the factory kwargs
    ``device``/``dtype``, become ``self.model_args``: the model's one record of how it was built,
    which its new heads, its plain counterpart and a saved config.json are made from."""
    def wrap(init):
        sig = inspect.signature(init)

        @functools.wraps(init)
        def checked(self, *args, **kwargs):
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            where = f"{type(self).__name__}: "
            arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
            check_args(arguments, where)
            self.model_args = {k: v for k, v in arguments.items() if k not in ("device", "dtype")}
            if family_check is not None:
                try:
                    family_check(arguments)
                except ModelArgError as e:
                    raise ModelArgError(e.arg, e.problem, where) from None
                bound.arguments.update(arguments)
            return init(*bound.args, **bound.kwargs)
        return checked
    return wrap

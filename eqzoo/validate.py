"""Checks of untrusted settings, run before any escnn or tensor work, and the model options.

A model's arguments may come from a config.json downloaded from the Hub or from a YAML file, so
they are untrusted input: a group of order 10**6 or a width of 10**9 would otherwise take all the
machine's memory before anything complained. :class:`Spec` says what one setting accepts (JSON
types, choices, a finite range with a named cap); strings are never booleans, booleans never
numbers, floats are finite. Run configs (:mod:`eqzoo.config`) and model options use it alike.

:data:`OPTIONS` is the one declaration of the model options: each :class:`Option` carries its
spec, whether it changes the function a checkpoint computes, and whether the layer factory takes
it. The per-argument checks, the factory's arguments (``FieldLayers.ARGS``), the load-time
override check and the saved config.json schema are all derived from it. A new option is
declared here and used where it acts (the layer factory or a layer); the families' constructors
name it as a keyword (timm style), which ``tests/test_models.py`` checks against this declaration.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Callable

from .errors import ModelArgError
from .groups import ACCEPTED, Group, get_group
from .kernels import BASES

# Caps: far above the models eqzoo ships (the widest is wide_resnet101_2, 2048 channels), low
# enough that a model within them builds on a workstation.
MAX_GROUP_ORDER = 32        # |G| of D<N> / C<N>: the field types and bases of larger groups take minutes and GBs
MAX_FIELD_BANDLIMIT = 7     # O(2)/SO(2) fields: the Fourier ReLU's 32 (O2) / 16 (SO2) samples must
                            # represent a field of 2 + 4L (O2) / 1 + 2L (SO2) channels
MAX_BANDLIMIT = 32          # λ's band-limits
MAX_WIDTH = 8192            # channels of any layer
MAX_BLOCKS = 64             # blocks per stage (resnet200 has 36)
MAX_CLASSES = 100_000       # ImageNet-22k has 21,843
MAX_IN_CHANS = 1024
MAX_WEIGHTS = 10**9        # tensor elements a model builds: coefficients, filters and the twirl's temporaries

NONE = type(None)
_CAP_FILE = "eqzoo/validate.py"


def is_json(value) -> bool:
    """Whether ``value`` is plain JSON data (what a config.json can hold; no NaN or infinity)."""
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def type_ok(value, types: tuple | None) -> bool:
    """Whether ``value`` has one of the JSON ``types`` (None: any JSON value). Booleans are never
    numbers, as in JSON and YAML; ``float`` accepts ints; a list is accepted for ``list`` or ``tuple``."""
    if types is None:
        return is_json(value)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, (list, tuple)) and (list in types or tuple in types):
        return is_json(value)
    if isinstance(value, numbers.Integral) and (int in types or float in types):
        return True
    if isinstance(value, numbers.Real) and float in types:
        return True
    return isinstance(value, tuple(t for t in types if t not in (int, float)))


_TYPE_WORDS = {bool: "true or false (a bool)", int: "an int", float: "a number", str: "a string", list: "a list",
               tuple: "a list", dict: "a mapping", NONE: "null"}


@dataclass(frozen=True)
class Spec:
    """What one setting accepts. ``types``: JSON types (``NONE`` for null); ``choices``: the
    accepted values; ``min``/``max``: an inclusive range (numbers, or each item of a list);
    ``cap``: the name of the constant ``max`` is, for the message; ``length``: a list's length;
    ``what``: the accepted values in words, for the message; ``check``: a further rule returning
    the problem or None. Floats must be finite."""

    types: tuple = (str,)
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    cap: str | None = None
    length: int | None = None
    what: str | None = None
    check: Callable | None = None

    def describe(self) -> str:
        if self.what:
            return self.what
        words = " or ".join(_TYPE_WORDS.get(t, getattr(t, "__name__", str(t))) for t in self.types if t is not NONE)
        return f"{words} (or null)" if NONE in self.types else words

    def _cap_note(self) -> str:
        return f" (eqzoo's cap {self.cap} in {_CAP_FILE})" if self.cap else ""

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` (a phrase to follow the setting's name), or None."""
        if value is None and NONE in self.types:
            return None
        if self.check is not None:
            return self.check(value)
        if self.choices is not None:  # equal and of the same type: True is not 1, "1" is not 1
            ok = any(value == c and type(value) is type(c) for c in self.choices)
            return None if ok else f"must be one of {tuple(self.choices)}, got {value!r}"
        if not type_ok(value, self.types):
            return f"must be {self.describe()}, got {value!r} ({type(value).__name__})"
        items = list(value) if isinstance(value, (list, tuple)) else None
        if items is not None:
            bad = (self.length is not None and len(items) != self.length) or not all(
                _is_int(x) and (self.min is None or x >= self.min) and (self.max is None or x <= self.max)
                for x in items)
            return f"must be {self.describe()}{self._cap_note()}, got {value!r}" if bad else None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(value):
                return f"must be a finite number, got {value!r}"
            if self.what and ((self.min is not None and value < self.min) or (self.max is not None and value > self.max)):
                return f"must be {self.what}, got {value!r}"
            if self.min is not None and value < self.min:
                null = " (or null)" if NONE in self.types else ""
                return f"must be >= {self.min}{null}, got {value}"
            if self.max is not None and value > self.max:
                return f"is {value}, above the maximum of {self.max}{self._cap_note()}"
        return None


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# -- the model options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option(Spec):
    """One model option. ``effect``: ``"function"`` (another value gives the same weights' shapes
    another function: a load may not change it), ``"architecture"`` (another value gives other
    shapes: checked against the checkpoint's) or ``"free"`` (a load may change it: fine-tuning);
    ``layer``: the layer factory takes it; ``common``: every pe model family takes it."""

    effect: str = "free"
    layer: bool = False
    common: bool = False
    doc: str = ""


def _group_problem(v) -> str | None:
    if not isinstance(v, (str, Group)):
        return f"must be a group spec string, one of {ACCEPTED}; got {v!r} ({type(v).__name__})"
    if isinstance(v, str) and not (v.isascii() and v.isprintable()):
        return f"must be a group spec string of ASCII letters and digits, one of {ACCEPTED}; got {v!r}"
    try:
        G = get_group(v)
    except ValueError as e:
        return f"must be a known group: {e}"
    if G.order > MAX_GROUP_ORDER:
        return (f"{G.spec} has order {G.order}, above the maximum of {MAX_GROUP_ORDER} (eqzoo's cap "
                f"MAX_GROUP_ORDER in {_CAP_FILE}; e.g. D16, C32, or the continuous 'O2'/'SO2')")
    return None


def _block_problem(v) -> str | None:
    if isinstance(v, str):
        return None if v in ("basic", "bottleneck") else f"must be 'basic', 'bottleneck' or a block class, got {v!r}"
    if isinstance(v, type) and _is_int(getattr(v, "expansion", None)):
        return None
    return f"must be 'basic', 'bottleneck' or a block class (PEBasicBlock, PEBottleneck), got {v!r}"


def _out_bandlimit_problem(v) -> str | None:
    if v is None or (_is_int(v) and v == -1):
        return None  # None: no smoothing; -1: the group's default
    return Spec((int,), min=0, max=MAX_BANDLIMIT, cap="MAX_BANDLIMIT").problem(v) if _is_int(v) else \
        f"must be an int (or null, or -1 for the default), got {v!r} ({type(v).__name__})"


SHARE_MODES = ("layer", "stage", "model")
HEADS = ("auto", "plain", "learnt", "invariant")
NONLINEARITIES = ("auto", "fourier", "norm", "gated")
_RATE = dict(types=(float,), min=0, max=1, what="a number in [0, 1]")

OPTIONS: dict[str, Option] = {o_name: o for o_name, o in [
    # what the layers are: the factory's arguments
    ("group", Option(check=_group_problem, effect="function", layer=True, common=True,
                     doc=f"the symmetry group: {ACCEPTED}; its fields must fit the widths")),
    ("bandlimit", Option((int, NONE), min=0, max=MAX_BANDLIMIT, cap="MAX_BANDLIMIT", effect="function", layer=True,
                         common=True, doc="highest frequency of λ's logits (see eqzoo.GroupLikelihood)")),
    ("out_bandlimit", Option((int, NONE), check=_out_bandlimit_problem, effect="function", layer=True, common=True,
                             doc="highest frequency of λ the kernel sees; -1: the group's default")),
    ("field_bandlimit", Option((int, NONE), min=0, max=MAX_FIELD_BANDLIMIT, cap="MAX_FIELD_BANDLIMIT",
                               effect="function", layer=True, common=True,
                               doc="band-limit of the fields of O(2)/SO(2)")),
    ("share_likelihood", Option(choices=SHARE_MODES, effect="function", layer=True, common=True,
                                doc="one λ per convolution, per stage, or for the whole model")),
    ("learn_likelihood", Option((bool,), layer=True, common=True,
                                doc="false freezes every λ at uniform: the strict steerable model")),
    ("head", Option(choices=HEADS, effect="function", layer=True, common=True,
                    doc="classifier: plain (nn.Linear over all pooled channels), learnt (PELinear to trivial "
                        "logits with a learnt λ), invariant (the same, λ frozen uniform); auto: plain for "
                        "learnt λ, invariant for the strict model")),
    ("basis", Option(choices=BASES, effect="function", layer=True, common=True,
                     doc="kernel basis (eqzoo.kernels.BASES); auto: complete where the group maps the "
                         "pixel grid to itself, else antialiased")),
    ("nonlinearity", Option(choices=NONLINEARITIES, effect="function", layer=True, common=True,
                            doc="nonlinearity of O(2)/SO(2) fields: fourier (auto there; the ReLU sampled on the "
                                "group), norm (norm-ReLU per irrep) or gated (each field gated by its invariant "
                                "part); finite groups: auto (the channel-wise ReLU)")),
    # what a fine-tune may change
    ("num_classes", Option((int,), min=0, max=MAX_CLASSES, cap="MAX_CLASSES", common=True)),
    ("in_chans", Option((int,), min=1, max=MAX_IN_CHANS, cap="MAX_IN_CHANS", common=True)),
    ("global_pool", Option((str,), common=True, doc="timm's global pool; channel-wise ones only")),
    ("drop_rate", Option(**_RATE, common=True)),
    ("drop_path_rate", Option(**_RATE, common=True)),
    ("drop_block_rate", Option(**_RATE)),
    ("block_drop_rate", Option(**_RATE)),
    ("zero_init_last", Option((bool,))),
    # the architecture: the shapes of the weights
    ("block", Option(check=_block_problem, effect="architecture")),
    ("layers", Option((list,), length=4, min=1, max=MAX_BLOCKS, cap="MAX_BLOCKS", effect="architecture",
                      what=f"a list of 4 ints in [1, {MAX_BLOCKS}] (blocks per stage)")),
    ("channels", Option((list, NONE), length=4, min=1, max=MAX_WIDTH, cap="MAX_WIDTH", effect="architecture",
                        what=f"a list of 4 ints in [1, {MAX_WIDTH}] (widths)")),
    ("stem_width", Option((int,), min=1, max=MAX_WIDTH, cap="MAX_WIDTH", effect="architecture")),
    ("base_width", Option((int,), min=1, max=MAX_WIDTH, cap="MAX_WIDTH", effect="architecture")),
    ("depth", Option((int,), min=10, max=6 * MAX_BLOCKS + 4, cap="MAX_BLOCKS", effect="architecture")),
    ("widen_factor", Option((int,), min=1, max=MAX_WIDTH // 64, cap="MAX_WIDTH", effect="architecture")),
]}


def options_where(**flags) -> tuple[str, ...]:
    """Names of the options whose fields equal ``flags`` (e.g. ``layer=True``), in declaration order."""
    return tuple(name for name, o in OPTIONS.items() if all(getattr(o, k) == v for k, v in flags.items()))


def check_arg(name: str, value, where: str = "") -> None:
    """Check one model option by :data:`OPTIONS` (names not declared pass); raises :class:`ModelArgError`."""
    option = OPTIONS.get(name)
    problem = option.problem(value) if option is not None else None
    if problem is not None:
        raise ModelArgError(name, problem, where)


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


def check_size(n_elements: int) -> None:
    """Refuse a model that would build more than MAX_WEIGHTS tensor elements."""
    if n_elements > MAX_WEIGHTS:
        raise ModelArgError("arguments", f"give a model of about {n_elements:.2g} weights (coefficients, filters "
                                         f"and the twirl's temporaries), above the maximum of {MAX_WEIGHTS:.0e} "
                                         f"(eqzoo's cap MAX_WEIGHTS in {_CAP_FILE}); reduce the widths, depths "
                                         "or num_classes")

r"""How equivariant is a model: the learnt λ per layer next to the measured equivariance error.

For an element g acting exactly on the pixel grid (rotations by multiples of 90°, reflections) the
relative equivariance error of a map Φ between fields is

.. math:: ε_Φ(g) = \frac{\| Φ(g·x) - g·Φ(x) \|}{\| g·Φ(x) \|},

with g acting on a field f by :math:`(g·f)(x) = ρ(g)\, f(g^{-1}x)` (escnn's
``GeometricTensor.transform``). For the classifier logits (trivial fields, no spatial extent) it is
the invariance error :math:`\|Φ(g·x) - Φ(x)\| / \|Φ(x)\|`. A layer whose λ is uniform is exactly
equivariant (ε ≈ float precision, as long as every feature map keeps a centre pixel: use odd input
sizes such as 33 or 65 with strided layers); λ concentrated at the identity allows ε ≫ 0.
"""
from __future__ import annotations

import math

import torch
from escnn.nn import GeometricTensor
from torch import nn

from .groups import get_group, group_of
from .likelihood import as_likelihoods, likelihood_layers


def _compact(layers: list[str]) -> str:
    if len(layers) <= 2:
        return ", ".join(layers)
    return f"{layers[0]} … {layers[-1]} ({len(layers)} layers)"


@torch.no_grad()
def degree_of_equivariance(model) -> list[dict]:
    """One row per distinct likelihood, in the order the layers appear: ``layer`` (the layers using
    it, compact), ``layers`` (all of them), ``likelihood`` (module path), ``group``, ``kl_uniform``
    (0 = fully equivariant), ``mass_near_identity`` and ``closest_subgroup``.

    ``model``: a model, or ``{name: GroupLikelihood}`` as :func:`eqzoo.load_likelihoods` returns
    (the layers then come from each likelihood's ``.layers``)."""
    users = likelihood_layers(model)
    rows = []
    for key, lam in as_likelihoods(model).items():
        s = lam.summary()
        layers = users[key]
        rows.append({"layer": _compact(layers) or key, "layers": layers, "likelihood": key, "group": s["group"],
                     "kl_uniform": s["kl_uniform"], "mass_near_identity": s["mass_near_identity"],
                     "closest_subgroup": s["closest_subgroup"]})
    return rows


DEFAULT_COLUMNS = ("layer", "group", "kl_uniform", "mass_near_identity", "closest_subgroup")


def format_table(rows: list[dict], columns=None, floatfmt: str = ".3f") -> str:
    """A markdown table of ``rows`` (dicts); columns default to those of
    :func:`degree_of_equivariance` (or every key of the first row)."""
    if not rows:
        return "_(no rows)_"
    if columns is None:
        columns = list(DEFAULT_COLUMNS) if set(DEFAULT_COLUMNS) <= set(rows[0]) else [c for c in rows[0] if c != "layers"]

    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("--:" if any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                                         for r in rows) else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# -- measured equivariance ---------------------------------------------------------------------------
def pixel_elements(group) -> list[tuple[str, int, float]]:
    """``(name, s, θ)`` of the non-identity elements of ``group`` that act exactly on a pixel grid:
    rotations by multiples of 90° it contains, and the reflections composed with them."""
    G = get_group(group)
    if G.n_rot == 0 or G.n_rot % 4 == 0:
        degrees = [0, 90, 180, 270]
    elif G.n_rot % 2 == 0:
        degrees = [0, 180]
    else:
        degrees = [0]
    out = []
    for s in range(G.n_flip):
        for d in degrees:
            if s or d:
                name = ("flip" if s else "") + ("∘" if s and d else "") + (f"rot{d}" if d else "")
                out.append((name, s, math.radians(d)))
    return out


def _pe_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "basis_fingerprint") and hasattr(m, "in_type") and hasattr(m, "out_type")}


def _transform(t: torch.Tensor, field_type, g) -> torch.Tensor:
    return GeometricTensor(t.detach().cpu(), field_type).transform(g).tensor.to(t.dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def equivariance_error(model: nn.Module, x: torch.Tensor, elements=None, layers: bool = True) -> list[dict]:
    """Relative equivariance error of the model's output (``layer="output"``) and, with ``layers``,
    of every steerable layer's output, for each element g acting exactly on the pixel grid.

    Args:
        x: an input batch ``[B, C, H, W]`` (square; odd H keeps strided feature maps centred).
        elements: names from :func:`pixel_elements` (default: all of them for the model's group).
    Returns rows ``{"layer", "element", "likelihood": λ_layer(g) (None for the output), "error"}``,
    computed in eval mode (the model's mode is restored).
    """
    pe = _pe_layers(model)
    if not pe:
        raise ValueError("the model has no eqzoo layers (with in_type/out_type)")
    first = next(iter(pe.values()))
    G = first.group
    candidates = pixel_elements(G)
    if elements is not None:
        unknown = set(elements) - {c[0] for c in candidates}
        if unknown:
            raise ValueError(f"elements {sorted(unknown)} do not act exactly on pixels for {G.spec}; "
                             f"choose from {[c[0] for c in candidates]}")
        candidates = [c for c in candidates if c[0] in set(elements)]
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x must be a square batch [B, C, H, H], got {tuple(x.shape)}")

    feats: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=n: feats.__setitem__(name, out))
             for n, m in pe.items()] if layers else []
    was_training = model.training
    model.eval()
    rows = []
    try:
        y = model(x)
        ref = dict(feats)
        for name, s, theta in candidates:
            g = G.element(s, theta)
            feats.clear()
            gy = model(_transform(x, first.in_type, g))
            if y.dim() == 4:  # dense output: treat its channels as trivial fields
                want = _transform(y, first.in_type.gspace.type(*[first.in_type.gspace.trivial_repr] * y.shape[1]), g)
            else:
                want = y
            rows.append({"layer": "output", "element": name, "likelihood": None, "error": _rel(gy, want)})
            for lname, m in pe.items():
                if lname not in ref or lname not in feats:
                    continue
                f, gf = ref[lname], feats[lname]
                if f.dim() == 4 and f.shape[-1] != f.shape[-2]:
                    continue
                want = _transform(f, m.out_type, g) if f.dim() == 4 else \
                    torch.as_tensor(m.out_type.representation(g), dtype=f.dtype) @ f.T
                got = gf if f.dim() == 4 else gf.T
                lam = float(m.likelihood.density([g])[0])
                rows.append({"layer": lname, "element": name, "likelihood": lam, "error": _rel(got, want)})
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


@torch.no_grad()
def head_invariance(model: nn.Module, threshold: float = 0.5) -> dict:
    r"""How invariant a plain linear classifier (``head="plain"``) has become: the read-out of the
    symmetry a model breaks in its head, where no λ records it.

    The pooled features of the fields transform as :math:`p \mapsto ρ(g)\,p` when the input is
    transformed by g, so the logits :math:`Wp` are invariant to g iff :math:`Wρ(g) = W`. The score

    .. math:: s(g) = \langle Wρ(g), W \rangle / \|W\|^2 \;∈ [-1, 1]

    is 1 for an invariant head and about 0 for an unrelated one. Returns ``{"scores": {element
    name: s(g)}, "closest_subgroup"}``: the largest subgroup whose every element scores at least
    ``threshold`` (elements: all of a finite group, rotations by multiples of 45° for O(2)/SO(2))."""
    fc, ftype = getattr(model, "fc", None), getattr(model, "feature_type", None)
    if not isinstance(fc, nn.Linear) or ftype is None or fc.in_features % ftype.size:
        raise ValueError("head_invariance needs a pe model with a plain nn.Linear head (head='plain') on its "
                         "pooled fields")
    G = group_of(ftype)
    copies = fc.in_features // ftype.size  # catavgmax pools the fields twice
    W = fc.weight.detach().double().cpu()

    def score(s: int, k: int, n_rot: int) -> float:
        rho = torch.as_tensor(ftype.representation(G.element(s, 2 * math.pi * k / n_rot)), dtype=torch.float64)
        return float((W @ torch.block_diag(*[rho] * copies) * W).sum() / W.square().sum())

    return _invariance(G, score, G.n_rot if G.is_finite else 8, threshold)


def kernel_invariance(model: nn.Module, threshold: float = 0.5) -> dict[str, dict]:
    r"""The symmetry each layer's kernel has, read off the kernel itself rather than off λ.

    λ and the free kernels share the work: a kernel invariant to a subgroup K comes out of λ
    uniform on K, or of λ at the identity with K-invariant free kernels, so λ alone can understate
    the symmetry a layer keeps. With :math:`c` the twirled coefficients and :math:`T_g` the group's
    (orthogonal) action on them, the score

    .. math:: s(g) = \langle T_g c, c \rangle / \|c\|^2 \;∈ [-1, 1]

    is 1 iff the layer is equivariant to g. Returns ``{layer: {"scores", "closest_subgroup"}}``
    for every :class:`~eqzoo.nn.PEConv2d` over a finite group, as :func:`head_invariance` does."""
    from .nn import PEConv2d

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, PEConv2d) or not m.group.is_finite:
            continue
        with torch.no_grad():
            c = m.kernel_coefficients().double()
            eye = torch.eye(m.n_rot * m.group.n_flip, dtype=torch.float64)

            def score(s: int, k: int, n_rot: int, m=m, c=c, eye=eye) -> float:
                j = s * m.n_rot + k * m.n_rot // n_rot  # flip-major, as the quadrature grid
                return float((m.twirled_coefficients(eye[j], c) * c).sum() / c.square().sum())

            out[name] = _invariance(m.group, score, m.n_rot, threshold)
    if not out:
        raise ValueError("kernel_invariance needs a model with PEConv2d layers over a finite group")
    return out


def _invariance(G, score, n_rot: int, threshold: float) -> dict:
    """Scores of the elements (rotation k of n_rot, flip s) and the largest subgroup whose every
    element scores at least ``threshold``."""
    scores = {}
    for s in range(G.n_flip):
        for k in range(n_rot):
            scores[("flip∘" if s else "") + f"rot{round(360 * k / n_rot)}"] = score(s, k, n_rot)

    def kept(k: int, flip: bool) -> bool:
        if k == 0 or n_rot % k:
            return False  # continuous subgroups are not probed
        return min(scores[("flip∘" if s else "") + f"rot{round(360 * j / k)}"]
                   for s in range(1 + flip) for j in range(k)) >= threshold

    return {"scores": scores, "closest_subgroup": G.largest_subgroup(kept)}

r"""The learnt likelihood λ over a group G: how equivariant a layer is.

**The method** (Veefkind & Cesa, ICML 2024, arXiv:2406.03946). A layer's filter is the λ-twirl
of its coefficients, an average of the kernel's transformed copies weighted by λ (the definition
and its fast paths are in :mod:`eqzoo.nn.twirl`): uniform λ gives the strictly G-equivariant
kernels, λ concentrated at the identity leaves the kernel free, and λ uniform on a subgroup K gives
exactly K-equivariance. So λ, learnt per layer, is the layer's degree of equivariance.

At exactly uniform λ the twirl is a projection: the kernel's non-equivariant part gets no
gradient, so λ's gradient is a random projection of that part's initial value, and uniform λ is a
saddle training does not leave. A learnable λ therefore starts with a small peak at the identity
(:data:`INIT_PEAK`, still read as the whole group), while the kernel starts equivariant and its
symmetry-breaking part at zero (:meth:`~eqzoo.nn.PEConv2d.reset_parameters`), so every layer
starts *exactly* equivariant and both λ and the kernel can move. The data, against the regularisers of :mod:`eqzoo.regularizers` (the identity
stays λ's mode, neighbouring layers agree, the first λ is pulled to uniform), decides how much
symmetry each layer breaks.

**λ** is a density on G w.r.t. the normalised Haar measure (uniform ≡ 1):

.. math::
    λ(g) = \exp ℓ(g) \,/\, \textstyle\int_G \exp ℓ, \qquad
    ℓ(s, θ) = \sum_{k=0}^{L} \big(a_k + b_k (-1)^s\big)\cos kθ + \big(c_k + d_k (-1)^s\big)\sin kθ

(the ``b, d`` terms only where G has reflections). These functions span the matrix coefficients of
the irreps of G up to frequency L, so θ = (a, b, c, d) are the Fourier coefficients of the logits.
A frozen λ is uniform. For a finite group with L = N/2 every
positive function on G is reachable; the normalisation is then an exact mean over G. For O(2)/SO(2)
it is a quadrature on a fine grid (:data:`FINE_GRID` rotations), exact to float precision for the
smooth ``exp ℓ``.

What the kernel sees is ``λ_out = F_{L_out} ⋆ λ``, λ smoothed over the rotations by the Fejér
kernel :math:`F_L(θ) = \frac{1}{L+1}\big(\frac{\sin((L+1)θ/2)}{\sin(θ/2)}\big)^2 ≥ 0`. It is
band-limited at ``L_out`` *and non-negative everywhere* (a positive mixture of translates of a
non-negative kernel), so the twirl integrates against a genuine density and a quadrature with more
than ``L_out + F`` rotations is exact for a kernel of angular frequency ≤ F. ``out_bandlimit=None``
(the default for finite groups) means no smoothing: the kernel sees λ itself.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from ._buffers import ConstantBuffers
from .errors import HubConfigError, ModelArgError
from .groups import Group, get_group
from .validate import check_arg


def _has_autocast(device: torch.device) -> bool:
    # the meta device has no autocast: torch.autocast and is_autocast_enabled would raise there
    return getattr(torch.amp, "is_autocast_available", lambda t: t != "meta")(device.type)


def autocast_off(device: torch.device):
    """A context with autocast disabled on ``device`` (a no-op where it has no autocast)."""
    return torch.autocast(device.type, enabled=False) if _has_autocast(device) else contextlib.nullcontext()


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device`` (False where it has no autocast)."""
    return _has_autocast(device) and torch.is_autocast_enabled(device.type)


FINE_GRID = 256  # rotations used to normalise and integrate λ on O(2)/SO(2)
# log λ(e) - log λ(g) for g away from the identity, for a learnable λ at init. At exactly uniform λ
# the twirl is a projection: the kernel's non-equivariant part gets no gradient, so λ gets none
# either (a saddle it never leaves). A small peak lets both move, in the direction the data asks
# for, while the layer is still exactly equivariant (its kernel starts equivariant). 0.3 keeps the
# read-out at the whole group (λ(g) ≥ 0.74 λ(e)).
INIT_PEAK = 0.3
DEFAULT_BANDLIMIT = 4  # L and L_out for O(2)/SO(2), the reference defaults


class GroupLikelihood(ConstantBuffers, nn.Module):
    r"""A learnable density λ on a group, parameterised by the Fourier coefficients of its logits.

    Args:
        group: a group spec (``"D4"``, ``"O2"``, ...) or :class:`~eqzoo.groups.Group`.
        bandlimit: L, the highest frequency of the logits. Finite groups: default (and maximum)
            ``N // 2``, which makes every positive density reachable; O(2)/SO(2): default 4.
        out_bandlimit: ``L_out``, the highest frequency of λ the kernel sees (Fejér-smoothed, so
            it stays non-negative). Default ``None`` for finite groups (λ exactly), 4 for O(2)/SO(2).
        learnable: ``False`` freezes λ (uniform unless set with :meth:`set_density`).
        device, dtype: factory kwargs, as ``torch.nn`` layers take them.
    """

    def __init__(self, group, bandlimit: int | None = None, out_bandlimit: int | None = -1,
                 learnable: bool = True, device=None, dtype=None):
        super().__init__()
        for name, value in (("group", group), ("bandlimit", bandlimit), ("out_bandlimit", out_bandlimit)):
            check_arg(name, value, "GroupLikelihood: ")  # the caps, before any grid is built
        G = get_group(group)
        self.group = G
        if bandlimit is None:
            bandlimit = G.n_rot // 2 if G.is_finite else DEFAULT_BANDLIMIT
        if out_bandlimit == -1:
            out_bandlimit = None if G.is_finite else DEFAULT_BANDLIMIT
        if not isinstance(bandlimit, int) or bandlimit < 0:
            raise ValueError(f"bandlimit must be an int >= 0, got {bandlimit!r}")
        if G.is_finite:
            bandlimit = min(bandlimit, G.n_rot // 2)
        if out_bandlimit is not None:
            if not isinstance(out_bandlimit, int) or out_bandlimit < 0:
                raise ValueError(f"out_bandlimit must be None or an int >= 0, got {out_bandlimit!r}")
            if G.is_finite and 2 * out_bandlimit >= G.n_rot:
                out_bandlimit = None  # every frequency of a finite group: no smoothing needed
        if not G.is_finite and out_bandlimit is None:
            raise ValueError(f"{G.spec} needs a finite out_bandlimit (the kernel's quadrature is "
                             "exact only for band-limited λ); e.g. out_bandlimit=4")
        self.bandlimit = bandlimit
        self.out_bandlimit = out_bandlimit
        self._freqs = self._frequencies()
        self.coefficients = nn.Parameter(torch.zeros(len(self._freqs), device=device, dtype=dtype),
                                         requires_grad=learnable)
        self._register_constant_buffers(device, dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        r"""λ at init: uniform when frozen; when learnable, logits :data:`INIT_PEAK` at the identity
        and 0 elsewhere (finite groups), or :data:`INIT_PEAK` times the Fejér kernel
        :math:`F_L(θ)/F_L(0)` on the rotations (O(2)/SO(2), where λ is band-limited)."""
        if not self.learnable:
            self.coefficients.zero_()
            return
        G = self.group
        s, theta = G.grid(None if G.is_finite else FINE_GRID)
        theta = np.angle(np.exp(1j * theta))  # in (-π, π]
        if G.is_finite:
            peak = (s == 0) & (np.abs(theta) < 1e-9)
        else:
            k = np.arange(1, self.bandlimit + 1)[:, None]
            fejer = 1 + 2 * ((1 - k / (self.bandlimit + 1)) * np.cos(k * theta)).sum(0)
            peak = (s == 0) * fejer / (self.bandlimit + 1)
        # least squares on the features, in numpy: no device context (e.g. meta) reaches it
        sol = np.linalg.lstsq(self._features(s, theta), INIT_PEAK * peak.astype(np.float64), rcond=None)[0]
        self.coefficients.copy_(torch.from_numpy(sol).to(self.coefficients))

    # -- parameterisation ----------------------------------------------------------------------
    def _frequencies(self) -> list[tuple[int, str, int]]:
        """(k, 'cos'|'sin', flip-parity) for each real Fourier feature of the logits."""
        out = []
        for k in range(self.bandlimit + 1):
            trigs = ["cos"]
            # sin(kθ) vanishes on C_N when k = N/2 (and at k = 0): not a feature there
            if k > 0 and not (self.group.is_finite and 2 * k == self.group.n_rot):
                trigs.append("sin")
            for trig in trigs:
                for parity in range(self.group.n_flip):
                    out.append((k, trig, parity))
        return out

    def _features(self, s, theta) -> np.ndarray:
        """[points, features] in float64, computed in numpy so that no device context (e.g.
        building under ``torch.device('meta')``) can reach them."""
        s, theta = np.asarray(s, dtype=np.float64), np.asarray(theta, dtype=np.float64)
        cols = []
        for k, trig, parity in self._freqs:
            f = np.cos(k * theta) if trig == "cos" else np.sin(k * theta)
            cols.append(f * (1 - 2 * s) if parity else f)
        return np.stack(cols, axis=-1)

    def _constant_buffers(self, device=None, dtype=None) -> dict:
        """The Fourier features of the fine grid (see :data:`FINE_GRID`)."""
        s, theta = self.group.grid(None if self.group.is_finite else FINE_GRID)
        return {"_fine_features": torch.tensor(self._features(s, theta), dtype=dtype or torch.float32, device=device)}

    @property
    def learnable(self) -> bool:
        return self.coefficients.requires_grad

    def _coefficients(self) -> torch.Tensor:
        """The coefficients in float32 or better: the softmax and KLs are not safe in fp16."""
        c = self.coefficients
        return c.float() if c.dtype in (torch.float16, torch.bfloat16) else c

    def _fine_logits(self) -> torch.Tensor:
        """ℓ on the fine grid (flip-major), in float32 or better; call with autocast disabled."""
        c = self._coefficients()
        return self._fine_features.to(c) @ c

    def _fine_log_density(self) -> torch.Tensor:
        """log λ on the fine grid (flip-major)."""
        with autocast_off(self.coefficients.device):
            ell = self._fine_logits()
            return ell - torch.logsumexp(ell, 0) + math.log(ell.numel())

    def grid_density(self) -> torch.Tensor:
        """λ on the fine grid: all of G for finite groups, else FINE_GRID rotations per flip."""
        return self._fine_log_density().exp()

    def density(self, elements=None) -> torch.Tensor:
        """λ at escnn group elements (a list), or on the fine grid when ``elements`` is None."""
        if elements is None:
            return self.grid_density()
        s, theta = zip(*[self.group.coords(g) for g in elements])
        with autocast_off(self.coefficients.device):
            c = self._coefficients()
            # log λ(g) = ℓ(g) - log mean_grid exp ℓ
            log_z = torch.logsumexp(self._fine_logits(), 0) - math.log(self._fine_features.shape[0])
            return (torch.from_numpy(self._features(s, theta)).to(c) @ c - log_z).exp()

    def kernel_weights(self, n_rot: int | None = None) -> torch.Tensor:
        r"""Quadrature weights ``w_g`` (flip-major over :meth:`Group.grid`) with
        :math:`\sum_g w_g f(g) = \int_G λ_{out}(g) f(g)\,dg` for f of angular frequency < n_rot - L_out.
        They are non-negative and sum to 1; uniform λ gives ``1 / |grid|``."""
        G = self.group
        if self.out_bandlimit is None:  # λ itself on all of G: w_g = λ(g) / |G| = softmax of the logits
            with autocast_off(self.coefficients.device):
                return torch.softmax(self._fine_logits(), 0)
        lam = self.grid_density().view(G.n_flip, -1)  # [flip, rotations of the fine grid]
        m = lam.shape[1]
        n = G.n_rot if G.is_finite else int(n_rot)
        L = self.out_bandlimit
        if n <= 2 * L:
            raise ValueError(f"a quadrature of {n} rotations cannot carry λ of band-limit {L}")
        # Fejér: Fourier coefficient k of λ scaled by (1 - k/(L+1)), k <= L; evaluated at n points
        spec = torch.fft.rfft(lam, dim=1)[:, : L + 1]
        fejer = 1 - torch.arange(L + 1, device=lam.device, dtype=lam.dtype) / (L + 1)
        smooth = torch.fft.irfft(spec * fejer, n=n, dim=1) * (n / m)
        return (smooth / (n * G.n_flip)).flatten()

    # -- divergences -----------------------------------------------------------------------------
    def kl_uniform(self) -> torch.Tensor:
        """KL(λ ‖ uniform) = E_λ[log λ] ≥ 0 (exactly, on the normalising grid)."""
        log_lam = self._fine_log_density()
        return (log_lam.exp() * log_lam).mean()

    def kl(self, other: "GroupLikelihood", detach_other: bool = False) -> torch.Tensor:
        """KL(self ‖ other) on the common grid; ``detach_other`` stops gradients into ``other``."""
        if other.group != self.group:
            raise ValueError(f"KL between likelihoods on different groups: {self.group} vs {other.group}")
        log_p = self._fine_log_density()
        log_q = other._fine_log_density()
        if detach_other:
            log_q = log_q.detach()
        return (log_p.exp() * (log_p - log_q)).mean()

    def alignment(self) -> torch.Tensor:
        """log(max_g λ(g) / λ(e)) ≥ 0: zero iff the identity is a mode."""
        log_lam = self._fine_log_density()
        return log_lam.max() - log_lam[0]  # grid element 0 is the identity

    # -- analysis --------------------------------------------------------------------------------
    @torch.no_grad()
    def set_density(self, density) -> None:
        """Set λ (up to the band-limit) to a given positive density: a callable ``f(s, θ)`` on
        numpy arrays, or a tensor of values on the fine grid. Least squares on the log."""
        G = self.group
        s, theta = G.grid(None if G.is_finite else FINE_GRID)
        values = density(s, theta) if callable(density) else density
        values = torch.as_tensor(np.asarray(values, dtype=np.float64))
        if values.shape != (len(s),):
            raise ValueError(f"density must have {len(s)} values on the grid, got shape {tuple(values.shape)}")
        if (values <= 0).any():
            raise ValueError("density must be positive everywhere (λ = exp(logits))")
        X = self._fine_features.double()
        sol = torch.linalg.lstsq(X, values.log().unsqueeze(1)).solution.squeeze(1)
        self.coefficients.copy_(sol.to(self.coefficients))

    @torch.no_grad()
    def summary(self, threshold: float = 0.5) -> dict:
        """Readable degree of equivariance: KL to uniform, mass near the identity, and the largest
        subgroup K whose every element keeps at least ``threshold`` of the identity's likelihood
        (the layer is roughly K-equivariant)."""
        G = self.group
        lam = self.grid_density().double().cpu().view(G.n_flip, -1)
        m = lam.shape[1]
        # "near" = the identity itself for finite groups, rotations within ±π/8 on O(2)/SO(2)
        angle = torch.arange(m, dtype=torch.float64) * (2 * math.pi / m)
        dist = torch.minimum(angle, 2 * math.pi - angle)
        near = dist < 1e-9 if G.is_finite else dist <= math.pi / 8 + 1e-9
        mass_near = float(lam[0, near].sum() / lam.numel())
        lam_e = float(lam[0, 0])

        def kept(k: int, flip: bool) -> bool:
            if k == 0:  # all rotations: the grid's minimum over the rotation sheets it uses
                vals = lam[[0, 1] if flip else [0]]
            else:
                vals = self.density([G.element(s, 2 * math.pi * j / k) for s in range(1 + flip) for j in range(k)])
            return float(vals.min()) >= threshold * lam_e

        best = G.largest_subgroup(kept)
        return {"group": G.spec, "kl_uniform": float(self.kl_uniform()), "mass_near_identity": mass_near,
                "closest_subgroup": best, "bandlimit": self.bandlimit, "out_bandlimit": self.out_bandlimit}

    def extra_repr(self) -> str:
        return f"group={self.group.spec}, bandlimit={self.bandlimit}, out_bandlimit={self.out_bandlimit}, learnable={self.learnable}"

    # -- the record (likelihoods.json) -------------------------------------------------------------
    @torch.no_grad()
    def to_record(self, layers=()) -> dict:
        """λ as plain data: the ``layers`` using it, group, band-limits, coefficients, λ on a grid of
        the group (flip-major, θ in radians) and its :meth:`summary`. :meth:`from_record` reads it."""
        G = self.group
        density = self.grid_density()
        s, theta = G.grid(None if G.is_finite else density.numel() // G.n_flip)
        return {
            "layers": list(layers),
            "group": G.spec,
            "bandlimit": self.bandlimit,
            "out_bandlimit": self.out_bandlimit,
            "learnable": self.learnable,
            "coefficients": [float(c) for c in self.coefficients.detach().cpu().double()],
            "frequencies": [list(f) for f in self._freqs],
            "grid": {"flip": [int(v) for v in s], "theta": [round(float(t), 8) for t in theta],
                     "density": [float(v) for v in density.detach().cpu().double()]},
            "summary": self.summary(),
        }

    @classmethod
    def from_record(cls, record, where: str = "likelihood") -> "GroupLikelihood":
        """The likelihood a :meth:`to_record` record describes, with ``.layers`` the module paths
        using it. The record is untrusted (it may come from the Hub): its group and band-limits are
        checked against eqzoo's caps before anything is built; :class:`HubConfigError` otherwise."""
        if not isinstance(record, dict):
            raise HubConfigError(f"{where} must be a JSON object, got {type(record).__name__}")
        for key in ("group", "bandlimit", "out_bandlimit", "coefficients"):
            if key not in record:
                raise HubConfigError(f"{where} has no {key!r}")
        try:
            for key in ("group", "bandlimit", "out_bandlimit"):
                check_arg(key, record[key])
        except ModelArgError as err:
            raise HubConfigError(f"{where}: {err}") from None
        learnable, c, layers = record.get("learnable", True), record["coefficients"], record.get("layers", [])
        if not isinstance(learnable, bool):
            raise HubConfigError(f"{where}: 'learnable' must be true or false, got {learnable!r}")
        if not (isinstance(c, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in c)):
            raise HubConfigError(f"{where}: 'coefficients' must be a list of numbers")
        if not (isinstance(layers, list) and all(isinstance(v, str) for v in layers)):
            raise HubConfigError(f"{where}: 'layers' must be a list of module paths")
        lam = cls(record["group"], record["bandlimit"], record["out_bandlimit"], learnable=learnable)
        coeffs = torch.tensor(c, dtype=lam.coefficients.dtype)
        if coeffs.shape != lam.coefficients.shape:
            raise HubConfigError(f"{where} has {coeffs.numel()} coefficients, {lam.coefficients.numel()} expected "
                                 f"for {record['group']} at band-limit {record['bandlimit']}")
        with torch.no_grad():
            lam.coefficients.copy_(coeffs)
        lam.layers = list(layers)
        return lam


def likelihoods(model: nn.Module) -> dict[str, GroupLikelihood]:
    """The model's distinct likelihoods, by the module path where each first appears."""
    out, seen = {}, set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, GroupLikelihood) and id(module) not in seen:
            seen.add(id(module))
            out[name] = module
    return out


def likelihood_layers(model_or_likelihoods) -> dict[str, list[str]]:
    """``{likelihood path: [module paths of the layers using it]}`` of a model, or of a
    ``{name: GroupLikelihood}`` dict (each likelihood's ``.layers``, as :meth:`from_record` sets)."""
    if isinstance(model_or_likelihoods, GroupLikelihood):
        model_or_likelihoods = {"likelihood": model_or_likelihoods}
    if not isinstance(model_or_likelihoods, nn.Module):
        return {key: list(getattr(lam, "layers", [])) for key, lam in model_or_likelihoods.items()}
    users: dict[int, list[str]] = {}
    for name, m in model_or_likelihoods.named_modules():
        lam = getattr(m, "likelihood", None)
        if isinstance(lam, GroupLikelihood):
            users.setdefault(id(lam), []).append(name)
    return {key: users.get(id(lam), []) for key, lam in likelihoods(model_or_likelihoods).items()}


def as_likelihoods(model_or_likelihoods) -> dict[str, GroupLikelihood]:
    """A model's likelihoods, a ``{name: GroupLikelihood}`` dict as it is, or ``{"likelihood": λ}``."""
    if isinstance(model_or_likelihoods, GroupLikelihood):
        return {"likelihood": model_or_likelihoods}
    if isinstance(model_or_likelihoods, nn.Module):
        return likelihoods(model_or_likelihoods)
    return dict(model_or_likelihoods)


def likelihood_records(model_or_likelihoods) -> dict[str, dict]:
    """``{name: record}`` (see :meth:`GroupLikelihood.to_record`) of every distinct likelihood of a
    model, or of a ``{name: GroupLikelihood}`` dict."""
    layers = likelihood_layers(model_or_likelihoods)
    return {key: lam.to_record(layers[key]) for key, lam in as_likelihoods(model_or_likelihoods).items()}


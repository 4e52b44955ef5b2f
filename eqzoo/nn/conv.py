r"""Partially equivariant convolution and linear layers on plain tensors.

The filter is κ_λ = A_λ κ_0 + (A_λ - P) κ_1, built from the unconstrained coefficients κ_0
(``weight``) and, where λ is learnable, κ_1 (``weight_breaking``) by the twirl of
:mod:`eqzoo.nn.twirl`; everything but the twirl's few weights is precomputed when the layer is
built. In eval mode the filter is cached until the weights, λ, the device or the dtype change.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import group_of
from ..kernels import kernel_basis, quadrature_size, resolved_basis
from ..likelihood import GroupLikelihood, autocast_enabled, autocast_off
from . import harmonic_conv
from .fields import check_input, single_repr
from .twirl import Dims, Twirl, twirl_of, twirl_operators


class _TwirledLayer(nn.Module):
    """What PEConv2d and PELinear share: the coefficients and their init, the twirl, the eval
    cache, the state_dict in the canonical layout, export."""

    def __init__(self, in_type, out_type, kernel_size: int, dilation: int, bias: bool,
                 likelihood: GroupLikelihood | None, basis: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        rep_in, rep_out = single_repr(in_type, "in_type"), single_repr(out_type, "out_type")
        if in_type.gspace != out_type.gspace:
            raise ValueError(f"in_type and out_type live on different gspaces: {in_type.gspace.name} "
                             f"vs {out_type.gspace.name}")
        self.group = group_of(in_type)
        if likelihood is None:
            likelihood = GroupLikelihood(self.group, **dd)
        elif not isinstance(likelihood, GroupLikelihood):
            raise TypeError(f"likelihood must be a GroupLikelihood or None, got {type(likelihood).__name__}")
        elif likelihood.group != self.group:
            raise ValueError(f"likelihood is over {likelihood.group} but the fields are over {self.group}")
        self.likelihood = likelihood
        self.in_type, self.out_type = in_type, out_type
        self.in_channels, self.out_channels = in_type.size, out_type.size
        self.kernel_size, self.dilation = kernel_size, dilation
        self.basis = basis = resolved_basis(basis, self.group)
        # the operators are host-side constants (numpy, and escnn's torch code for the rings): built
        # on the CPU whatever device context the layer is built under, e.g. torch.device('meta')
        with torch.device("cpu"):
            functions = kernel_basis(kernel_size, dilation, basis, self.group)
            self.n_rot = quadrature_size(self.group, rep_in, rep_out, functions, likelihood.out_bandlimit)
            self._ops = twirl_operators(self.group, rep_in, rep_out, kernel_size, dilation, self.n_rot, basis)
        self.basis_fingerprint = self._ops.fingerprint
        self._dims = Dims(rep_out.size, rep_in.size, functions.size, len(out_type), len(in_type))
        # Coefficients [d_out * d_in * H, F_out, F_in]: rows (out component, in component, basis
        # function) of every (out field, in field) pair, the layout in which the twirl moves whole
        # contiguous rows; with a regular frame the rows are that frame's coordinates (see
        # eqzoo.nn.twirl.frame), and state_dict() holds the canonical layout. 3-D: without a
        # spatial layout, channels_last conversions leave it alone.
        self.weight = nn.Parameter(torch.empty(self._dims.rows, len(out_type), len(in_type), **dd))
        # κ_1: a parameter where λ learns; a frozen-λ layer has none, unless it loads a non-zero one
        # (a learnt checkpoint loaded with λ frozen computes the same function)
        if likelihood.learnable:
            self.weight_breaking = nn.Parameter(torch.empty_like(self.weight))
        else:
            self.register_buffer("weight_breaking", None)
        t = self._ops.invariant_out.shape[1]
        self.register_parameter("bias", nn.Parameter(torch.zeros(len(out_type), t, **dd)) if bias and t else None)
        self._cache = None
        self.reset_parameters()
        self._prepare_constants()

    def _prepare_constants(self) -> None:
        """Make the twirl's tensors for the weight's dtype and device now, in eager mode: under
        ``torch.compile`` whatever is not cached yet would be built inside the graph, at every step."""
        if not self.weight.is_meta and not torch.compiler.is_compiling():
            self._twirl().prepare(self._dims)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """κ_0 starts equivariant (scaled by :meth:`_init_weight`), κ_1 and the bias at 0: then the
        layer starts exactly equivariant for any λ, and λ's gradient is not a random projection of
        a random non-equivariant part (which would pull λ towards arbitrary subgroups)."""
        self._cache = None
        for t in (self.bias, self.weight_breaking):
            if t is not None:
                t.zero_()
        if self.weight.is_meta:  # no values to scale: to_empty() then reset_parameters() will
            return
        self._init_weight()
        self.weight.copy_(self._twirl().projected(self._dims, self.weight))

    def _init_weight(self) -> None:
        """He init of the filter *at uniform λ* (the twirl keeps only part of κ_0's energy): the
        equivariant filter has std sqrt(2 / fan_in), as a convolution followed by a ReLU wants."""
        nn.init.normal_(self.weight)
        # every (in field, out field) pair is twirled alike: a block of at most 8 x 8 field pairs
        # gives the filter's std without synthesising the whole filter at build time
        w = self.weight[:, :8, :8]
        twirl = self._twirl()
        filt = twirl("pixels", self._dims_of(w), w.new_full((twirl.size,), 1.0 / twirl.size), w)
        std = float(filt.std()) if filt.numel() > 1 else 0.0
        if std > 0:
            self.weight.mul_(math.sqrt(2.0 / (self.in_channels * self.kernel_size**2)) / std)

    def _dims_of(self, w: torch.Tensor) -> Dims:
        """The layer's sizes for coefficients ``w`` of this layout with any number of field pairs."""
        return Dims(self._dims.d_out, self._dims.d_in, self._dims.harmonics, *w.shape[1:])

    def _twirl(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Twirl:
        """The twirl's tensors in ``dtype`` on ``device`` (default: the weight's)."""
        return twirl_of(self._ops, dtype or self.weight.dtype, device or self.weight.device)

    def twirled_coefficients(self, q: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """The coefficients ``w`` twirled with quadrature weights ``q``, both in the canonical layout
        ``[d_out * d_in * H, F_out, F_in]`` of :meth:`canonical_weight` (default: the weight's). A
        one-hot ``q`` at element g gives g's action on the coefficients, an orthogonal map."""
        w = self.canonical_weight() if w is None else w
        dims, twirl = self._dims_of(w), self._twirl(w.dtype, w.device)
        return Twirl.rows_of_matrix(twirl.canonical_twirl("harmonics", dims, q.to(w.dtype), w), dims)

    def kernel_coefficients(self) -> torch.Tensor:
        """The coefficients of the layer's filter κ_λ in the canonical layout (with gradients)."""
        return Twirl.rows_of_matrix(self._filter("harmonics"), self._dims)

    def canonical_weight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients ``w`` (default: the weight) in the canonical layout, as ``state_dict()``
        holds them (a differentiable change of coordinates where the layer stores its parameters
        in its regular frame)."""
        w = self.weight if w is None else w
        return self._twirl(w.dtype, w.device).canonical(self._dims_of(w), w)

    def _stored(self, w: torch.Tensor) -> torch.Tensor:
        """Canonical coefficients in the weight's own layout (the inverse of :meth:`canonical_weight`)."""
        return self._twirl(w.dtype, w.device).stored(self._dims_of(w), w)

    def _filter(self, kind: str) -> torch.Tensor:
        """κ_λ = A_λ κ_0 + (A_λ - P) κ_1 as ``kind``: ``"pixels"`` gives the filter [C_out, C_in,
        k, k], ``"harmonics"`` the matrix [(out component, out field), (in component, basis
        function, in field)]."""
        q = self.likelihood.kernel_weights(self.n_rot).to(self.weight.dtype)
        return self._twirl()(kind, self._dims, q, self.weight, self.weight_breaking)

    def _coefficients_and_bias(self, kind: str = "pixels"):
        """The twirled coefficients as ``kind`` (see :meth:`_filter`) and the bias, in full precision."""
        with autocast_off(self.weight.device):
            bias = None
            if self.bias is not None:
                bias = (self.bias @ self._twirl(self.bias.dtype).bias_basis.T).reshape(-1)
            return self._filter(kind), bias

    def filter_and_bias(self):
        """The current filter and bias as plain tensors (recomputed, with gradients)."""
        return self._coefficients_and_bias("pixels")

    def _state(self) -> list[torch.Tensor]:
        """The tensors the filter and bias are made of."""
        state = (self.weight, self.weight_breaking, self.likelihood.coefficients, self.bias)
        return [t for t in state if t is not None]

    def _current(self):
        if not self.training and torch.jit.is_tracing():
            # TorchScript tracing (torch.jit.trace, the legacy ONNX exporter) of an eval-mode layer
            # records the filter as a constant, computed with the tracer paused: the twirl's custom
            # autograd function cannot be traced, and an inference graph needs only the filter
            with _tracing_paused():
                return self._cached()
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in self._state())
        if self.training or needs_grad or torch.compiler.is_compiling() or self.weight.is_meta:
            self._cache = None
            return self.filter_and_bias()
        return self._cached()

    def _cached(self):
        """The filter and bias from the eval cache, recomputed when the weights or λ changed."""
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in self._state())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key,) + tuple(self.filter_and_bias())
        return self._cache[1], self._cache[2]

    def _filter_for(self, x: torch.Tensor, spatial: bool):
        """Check ``x`` and return the current filter and bias in the dtype it is computed in (None:
        take the harmonic-domain convolution)."""
        if not torch.jit.is_tracing():  # (a trace fixes the shapes: the check would only warn there)
            check_input(self, x, self.in_type, self.weight.dtype, spatial)
        if spatial and self.training and harmonic_conv.pays(self, x):
            return None
        filt, bias = self._current()
        filt = filt.to(x.dtype) if not autocast_enabled(x.device) else filt
        return filt, (bias.to(filt.dtype) if bias is not None else None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("weight", "weight_breaking"):  # saved in the canonical layout, whatever the storage
            t = destination.get(prefix + name)
            if t is not None:
                destination[prefix + name] = self.canonical_weight(t if keep_vars else t.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight_breaking"
        if not isinstance(self.weight_breaking, nn.Parameter):  # frozen λ: κ_1 only where it is non-zero
            t = state_dict.get(key)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.any():
                del state_dict[key]  # (A_λ - P) 0 = 0: nothing to keep
                t = None
            self.weight_breaking = torch.empty_like(self.weight) if isinstance(t, torch.Tensor) else None
        for name in ("weight", "weight_breaking"):  # canonical layout -> storage; bad shapes and dtypes
            t = state_dict.get(prefix + name)  # are left for load_state_dict to report
            if isinstance(t, torch.Tensor) and t.shape == self.weight.shape and t.is_floating_point():
                state_dict[prefix + name] = self._stored(t)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._cache = None  # moved / cast: rebuild the cached filter
        out = super()._apply(fn, recurse)
        self._prepare_constants()  # for the new device and dtype
        return out

    @torch.no_grad()
    def export(self) -> nn.Module:
        """The plain torch layer (``nn.Conv2d`` / ``nn.Linear``) computing the same function: the
        current filter, frozen."""
        filt, bias = self.filter_and_bias()
        plain = self._plain(bias is not None, device=filt.device, dtype=filt.dtype)
        plain.weight.copy_(filt.view_as(plain.weight))
        if bias is not None:
            plain.bias.copy_(bias)
        return plain

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module first: fail here, with what to do instead,
        # rather than deep in the compiler
        raise RuntimeError(
            f"{type(self).__name__} does not compile to TorchScript: its filter comes from a custom autograd "
            "function (the twirl) and a Python-side cache. Script the exported model, which computes the same "
            "function in eval mode: torch.jit.script(eqzoo.export(model)); or trace the model in eval mode: "
            "torch.jit.trace(model.eval(), example_input) records the current filters as constants.")


@contextlib.contextmanager
def _tracing_paused():
    """Suspend TorchScript tracing: what is computed inside is recorded as a constant."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class PEConv2d(_TwirledLayer):
    r"""Steerable convolution with a learnt degree of equivariance.

    Args:
        in_type, out_type: escnn FieldTypes over the same gspace, each made of copies of one
            representation. Tensors are plain ``[B, C, H, W]`` with channels grouped per field.
        kernel_size, stride, padding, dilation, bias: as :class:`torch.nn.Conv2d` (square kernels).
        likelihood: the :class:`~eqzoo.GroupLikelihood` to use (shared by passing the same object),
            or ``None`` for a fresh one owned by this layer. A frozen uniform likelihood
            (``learnable=False``) gives the strict steerable convolution.
        basis: ``"auto"`` (default: ``"complete"`` for C1, C2, C4, D1, D2, D4, else
            ``"antialiased"``), ``"antialiased"`` (escnn's smooth ring harmonics) or ``"complete"``
            (spans every k x k kernel); see :data:`eqzoo.kernels.BASES`.
    """

    def __init__(self, in_type, out_type, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = True, likelihood: GroupLikelihood | None = None,
                 basis: str = "auto", device=None, dtype=None):
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        super().__init__(in_type, out_type, kernel_size, dilation, bias, likelihood, basis,
                         device=device, dtype=dtype)
        self.stride, self.padding = stride, padding
        self._patch_projections = {}  # input size, dtype, device -> see harmonic_conv.patch_projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = self._filter_for(x, spatial=True)
        if current is None:
            return harmonic_conv.conv_in_harmonics(self, x)
        return F.conv2d(x, *current, self.stride, self.padding, self.dilation)

    def _plain(self, bias: bool, **dd) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=bias, **dd)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, group={self.group.spec}, basis={self.basis}")


class PELinear(_TwirledLayer):
    """Linear map between fields (``[B, C]`` tensors) with a learnt degree of equivariance, e.g.
    a head from the last fields to trivial class logits (invariant while λ is uniform)."""

    def __init__(self, in_type, out_type, bias: bool = True, likelihood: GroupLikelihood | None = None,
                 device=None, dtype=None):
        super().__init__(in_type, out_type, 1, 1, bias, likelihood, device=device, dtype=dtype)

    def _init_weight(self) -> None:
        """``nn.Linear``'s init, U(±1/sqrt(in_features)), of the coefficients, which
        :meth:`reset_parameters` then projects, so that a classifier's logits start as small as
        timm's (He-scaling would make an invariant head's logits far larger: the positive means of
        pooled ReLU features add up within each field)."""
        bound = 1.0 / math.sqrt(self.in_channels)
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        filt, bias = self._filter_for(x, spatial=False)
        return F.linear(x, filt[:, :, 0, 0], bias)

    def _plain(self, bias: bool, **dd) -> nn.Linear:
        return nn.Linear(self.in_channels, self.out_channels, bias=bias, **dd)

    def extra_repr(self) -> str:
        return f"in_features={self.in_channels}, out_features={self.out_channels}, group={self.group.spec}"

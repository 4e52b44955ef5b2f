"""The twirl and the kernel bases: every fast path of the twirl against its definition
(:mod:`eqzoo.nn.twirl.reference`), the kernel space each basis spans, the regular frame's storage,
the symmetry-breaking part, and the harmonic-domain convolution."""
import numpy as np
import pytest
import torch

from eqzoo import GroupLikelihood
from eqzoo.groups import get_group
from eqzoo.kernels import kernel_basis, ring_harmonics
from eqzoo.nn import PEConv2d, PELinear, harmonic_conv
from eqzoo.nn.twirl import Twirl, reference
from eqzoo.nn.twirl.operators import _compute_operators
from test_layers import equivariance_errors, kernel_space, pixel_elements, rank, rel_err
from trained import generic_kernels

GRID_GROUPS = ["C1", "C2", "C4", "D1", "D2", "D4"]

# -- the kernel bases ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_complete_basis_spans_every_kernel(k):
    """basis="complete": over C1 (and with λ at the identity of D4) the filters span every k x k
    kernel of every channel pair, as nn.Conv2d's; the antialiased default spans fewer."""
    C1, D4 = get_group("C1"), get_group("D4")
    conv = PEConv2d(C1.trivial_type(2), C1.trivial_type(3), k, basis="complete").double()
    assert rank(kernel_space(conv), 1e-9) == 2 * 3 * k * k == conv.weight.numel()  # exactly a basis
    smooth = PEConv2d(C1.trivial_type(2), C1.trivial_type(3), k, basis="antialiased").double()
    assert (rank(kernel_space(smooth), 1e-9) < 2 * 3 * k * k) == (k > 1)
    if k == 3:  # (larger kernels: thousands of weight vectors to synthesise)
        lam = GroupLikelihood(D4, learnable=False)
        lam.set_density(lambda s, t: np.where((s == 0) & np.isclose(t, 0), 1.0, 1e-12))
        free = PEConv2d(D4.field_type(1), D4.field_type(1), k, likelihood=lam, basis="complete").double()
        assert rank(kernel_space(free), 1e-9) == 8 * 8 * k * k


@pytest.mark.parametrize("spec", ["D4", "C4", "O2"])
def test_complete_basis_is_equivariant_on_the_pixel_grid(spec):
    """At uniform λ the complete basis is as equivariant as the antialiased one to the elements
    that map the pixel grid to itself."""
    torch.manual_seed(0)
    G = get_group(spec)
    fin, fout = G.field_type(1), G.field_type(2)
    conv = PEConv2d(fin, fout, 5, padding=2, basis="complete").double()
    x = torch.randn(2, fin.size, 13, 13, dtype=torch.float64)
    errs = equivariance_errors(conv.eval(), fin, fout, x, pixel_elements(G))
    assert max(errs) <= 1e-5, errs


def _filter_space(ops, q, d_out, d_in):
    """Rows spanning the filters ``reference.pixel_filter(q, W)`` of all coefficients W."""
    R = d_out * d_in * ops.basis.shape[0]
    unit = torch.eye(R, dtype=torch.float64).view(d_out, d_in, -1, R, 1)  # one field pair per unit vector
    return reference.pixel_filter(torch.as_tensor(q), unit, ops).reshape(R, -1)


@pytest.mark.parametrize("spec, k, dilation, fields_in", [
    ("D4", 3, 1, "regular"), ("C4", 3, 2, "regular"), ("D1", 5, 1, "regular"), ("C2", 3, 1, "regular"),
    ("D2", 3, 1, "regular"), ("C1", 7, 1, "regular"), ("D4", 7, 1, "trivial"), ("D4", 5, 2, "trivial"),
    ("D4", 1, 1, "regular")])
def test_sampled_basis_spans_the_kernel_space_of_the_ring_harmonics(spec, k, dilation, fields_in):
    """Over the groups that map the pixel grid to itself the layer keeps one coefficient per pixel
    and component pair (the complete ring harmonics have more: 11 for 3x3), and spans exactly the
    kernels of the ring harmonics it reduces, for uniform λ (the strict space), λ at the identity
    (every kernel) and a random λ; its action on the coefficients stays a signed permutation."""
    G = get_group(spec)
    fin, fout = (G.trivial_type(1) if fields_in == "trivial" else G.field_type(1)), G.field_type(1)
    conv = PEConv2d(fin, fout, k, dilation=dilation, likelihood=GroupLikelihood(G, learnable=False))
    assert conv.basis == "complete" and conv._dims.harmonics == k * k
    ops = conv._ops
    rep_in, rep_out = fin.representations[0], fout.representations[0]
    rings = _compute_operators(G, rep_in, rep_out, ring_harmonics(k, dilation, "complete"), conv.n_rot)
    assert rings.basis.shape[0] > k * k or k == 1
    m = ops.rho_out.shape[0]
    identity = np.eye(m)[0]
    for q in (np.full(m, 1.0 / m), identity, np.random.default_rng(0).dirichlet(np.ones(m))):
        ours, theirs = (_filter_space(o, q, rep_out.size, rep_in.size) for o in (ops, rings))
        r = rank(ours, 1e-9)
        assert r == rank(theirs, 1e-9) == rank(torch.cat([ours, theirs]), 1e-9)
        if q is identity:
            assert r == rep_out.size * rep_in.size * k * k  # every kernel
    T = np.abs(ops.harmonic_action)
    assert np.allclose(T, T.round()) and np.allclose(T.sum(-1), 1)


def test_bases_are_reduced_only_where_that_is_exact():
    """Off the pixel grid (D8, O(2), SO(2)) the ring harmonics' null space on the pixels is not
    invariant, so they are kept as they are; on it, a basis is reduced only where its harmonics
    are dependent (escnn's 4 x 4 rings: 6 functions spanning 5 kernels; its 3 x 3 rings are not)."""
    for spec in ("D8", "O2", "SO2"):
        assert kernel_basis(3, 1, "complete", get_group(spec)) is ring_harmonics(3, 1, "complete")
    D4 = get_group("D4")
    assert kernel_basis(3, 1, "antialiased", D4) is ring_harmonics(3, 1, "antialiased")
    assert ring_harmonics(4, 1, "antialiased").size == 6 and kernel_basis(4, 1, "antialiased", D4).size == 5


# -- the twirl paths against its definition --------------------------------------------------------

@pytest.mark.parametrize("spec, k, out, path", [
    ("D4", 3, "regular", "frame"), ("C4", 3, "regular", "frame"), ("D8", 3, "regular", "frame"),
    ("D1", 3, "regular", "frame"), ("C1", 3, "regular", "frame"), ("O2", 3, "regular", "sparse"),
    ("SO2", 3, "regular", "sparse"), ("D4", 1, "regular", "frame"), ("D8", 1, "regular", "frame"),
    ("O2", 1, "regular", "sparse"), ("D4", 5, "regular", "frame"), ("D4", 3, "trivial", "sparse"),
    ("D8", 3, "trivial", "sparse"), ("D4", 3, "strict", "frame")])
def test_every_twirl_path_equals_the_definition(spec, k, out, path):
    """The layer's twirl (the regular frame or the sparse gathers, as the pixel filter and as the
    harmonic matrix) equals the definition κ_λ = A_λ κ_0 + (A_λ - P) κ_1 of
    :mod:`eqzoo.nn.twirl.reference` for a random λ and random κ_0, κ_1: values, and gradients
    w.r.t. κ_0, κ_1 and λ; and so does the canonical twirl of ``twirled_coefficients``."""
    torch.manual_seed(0)
    G = get_group(spec)
    L = None if G.is_finite else 2
    fin, fout = G.field_type(2, L), (G.trivial_type(3) if out == "trivial" else G.field_type(3, L))
    lam = GroupLikelihood(G, out_bandlimit=L, learnable=out != "strict")
    conv = PEConv2d(fin, fout, k, likelihood=lam).double()
    assert (conv._twirl().frame is not None) == (path == "frame")
    with torch.no_grad():
        lam.coefficients.normal_()
        for t in (conv.weight, conv.weight_breaking):
            if t is not None:
                t.normal_()
    lam.coefficients.requires_grad_()
    params = [t for t in (conv.weight, conv.weight_breaking, lam.coefficients) if t is not None]
    d = conv._dims

    def definition(kind):
        q = lam.kernel_weights(conv.n_rot)
        W0 = conv.canonical_weight().view(d.shape)
        W1 = None if conv.weight_breaking is None else conv.canonical_weight(conv.weight_breaking).view(d.shape)
        if kind == "pixels":
            return reference.pixel_filter(q, W0, conv._ops, W1)
        return reference.coefficients(q, W0, conv._ops, W1).reshape(d.rows, d.fields_out, d.fields_in)

    def fast(kind):
        result = conv._filter(kind)
        return result if kind == "pixels" else Twirl.rows_of_matrix(result, d)

    for kind in ("pixels", "harmonics"):
        results = []
        for f in (fast, definition):
            y = f(kind)
            probe = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
            results.append([y.detach()] + list(torch.autograd.grad((y * probe).sum(), params)))
        for a, b in zip(*results):
            assert torch.allclose(a, b, atol=1e-12), (kind, float((a - b).abs().max()))
    q = torch.rand(lam.kernel_weights(conv.n_rot).numel(), dtype=torch.float64, requires_grad=True)
    W = conv.canonical_weight().detach().requires_grad_()
    results = []
    for y in (conv.twirled_coefficients(q, W), reference.twirl(q, W.view(d.shape), conv._ops).reshape(W.shape)):
        results.append([y.detach()] + list(torch.autograd.grad((y * W.detach()).sum(), (q, W))))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-12), float((a - b).abs().max())


@pytest.mark.parametrize("spec", ["D4", "D8"])
def test_regular_frame_storage_and_canonical_state_dict(spec):
    """Layers with regular out fields store their coefficients in the group's regular frame
    (where the twirl is one |G| x |G| product); state_dict() holds the canonical layout, which
    loads back exactly, and the frame is an orthogonal change of coordinates (for D4 a signed
    permutation, so that Adam's steps are the same in both)."""
    torch.manual_seed(0)
    G = get_group(spec)
    conv = PEConv2d(G.field_type(2), G.field_type(3), 3, padding=1).double()
    assert conv._twirl().frame is not None
    assert PELinear(G.field_type(2), G.trivial_type(3))._twirl().frame is None  # trivial out: canonical
    with torch.no_grad():
        conv.likelihood.coefficients.normal_()
        conv.weight_breaking.normal_()
    sd = conv.state_dict()
    assert torch.equal(sd["weight"], conv.canonical_weight().detach())
    assert torch.equal(sd["weight_breaking"], conv.canonical_weight(conv.weight_breaking).detach())
    assert not torch.allclose(sd["weight"], conv.weight)  # a different layout, the same numbers' norm
    assert torch.allclose(sd["weight"].norm(), conv.weight.detach().norm())
    fresh = PEConv2d(G.field_type(2), G.field_type(3), 3, padding=1).double()
    fresh.load_state_dict(sd)
    assert torch.allclose(fresh.weight, conv.weight, atol=1e-12)
    # (a loaded likelihood rebuilds its constants in float64, the original's were cast from float32)
    assert rel_err(fresh.filter_and_bias()[0], conv.filter_and_bias()[0]) <= 1e-7
    unit = torch.zeros_like(conv.weight)
    unit.view(-1)[::97] = 1
    image = conv.canonical_weight(unit)
    if spec == "D4":  # every unit coefficient goes to ± a unit coefficient
        rounded = image.round()
        assert torch.allclose(image, rounded, atol=1e-12) and torch.equal(rounded.abs().sum(), unit.sum())
    assert torch.allclose(conv._stored(image), unit, atol=1e-12)


def test_layers_share_their_operator_tensors():
    """Layers with the same operators share one copy of their tensors per dtype (the D8 twirl
    values are ~10 MB per 3x3 layer), cast from float64, so ``.double()`` layers get float64."""
    G = get_group("D8")
    a, b = (PEConv2d(G.field_type(2), G.field_type(3), 3) for _ in range(2))
    c = PEConv2d(G.field_type(2), G.field_type(3), 5)
    assert a._twirl() is b._twirl() and a._twirl() is not c._twirl()
    assert a._twirl().sparse.values.dtype == torch.float32
    assert a.double()._twirl().sparse.values.dtype == torch.float64
    assert b._twirl().sparse.values.dtype == torch.float32


def test_frame_constants_are_made_before_compiling():
    """A layer makes its regular frame's gathers when built and when moved or cast, so that a
    compiled graph reads them instead of rebuilding them (index arithmetic and a permutation of
    every layer at every step)."""
    torch.manual_seed(0)
    G = get_group("D4")
    conv = PEConv2d(G.field_type(3), G.field_type(5), 3, padding=1)
    for dtype in (torch.float32, torch.float64):
        conv.to(dtype)
        keys = conv._twirl().frame.gathers.keys()
        assert {("pixels", 5, 3), ("harmonics", 5, 3)} <= set(keys)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, conv.in_channels, 8, 8, dtype=torch.float64)
    torch.compile(conv, backend=backend)(x).sum().backward()
    ops = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert graphs and not any("arange" in op or "meshgrid" in op for op in ops), sorted(ops)


def test_symmetry_breaking_part():
    """κ_λ = A_λ κ_0 + (A_λ - P) κ_1: κ_1 is a parameter where λ is learnable (none where it is
    frozen, and none in its state_dict), starts at 0, has no effect at uniform λ, and gets its own
    gradient. A state dict without it does not load into a learnt layer; a learnt layer's state
    loads into a frozen-λ layer as the same function, which keeps κ_1 only where it is non-zero."""
    torch.manual_seed(0)
    G = get_group("D4")
    ftype = G.field_type(2)
    strict = PEConv2d(ftype, ftype, 3, padding=1, likelihood=GroupLikelihood(G, learnable=False)).double()
    assert strict.weight_breaking is None and "weight_breaking" not in strict.state_dict()
    conv = PEConv2d(ftype, ftype, 3, padding=1).double()
    assert conv.weight_breaking.shape == conv.weight.shape and float(conv.weight_breaking.abs().max()) == 0
    x = torch.randn(2, ftype.size, 9, 9, dtype=torch.float64)
    generic_kernels(conv)
    with torch.no_grad():
        conv.likelihood.coefficients.zero_()  # uniform λ: κ_1 drops out
        y_uniform = conv(x)
        conv.weight_breaking.normal_()
        assert torch.allclose(conv(x), y_uniform, atol=1e-10)
    conv.likelihood.reset_parameters()
    conv(x).square().sum().backward()
    assert float(conv.weight_breaking.grad.abs().max()) > 0
    fresh = PEConv2d(ftype, ftype, 3, padding=1).double()
    with pytest.raises(RuntimeError, match="Missing key.*weight_breaking"):
        fresh.load_state_dict({k: v for k, v in conv.state_dict().items() if k != "weight_breaking"})
    with torch.no_grad():
        # a learnt layer's state loaded into a frozen-λ layer is the same function: a zero κ_1 is
        # dropped, a non-zero one kept (and saved)
        frozen = PEConv2d(ftype, ftype, 3, padding=1, likelihood=GroupLikelihood(G, learnable=False)).double()
        conv.weight_breaking.zero_()
        # compared with layers that loaded the same state: storing canonical coefficients in the
        # regular frame rounds, so a layer's own weights and a loaded copy differ in the last bits
        def loaded(state, learnable=True):
            layer = PEConv2d(ftype, ftype, 3, padding=1, likelihood=GroupLikelihood(G, learnable=learnable))
            layer.double().load_state_dict(state)
            return layer

        frozen.load_state_dict(conv.state_dict())
        assert frozen.weight_breaking is None and "weight_breaking" not in frozen.state_dict()
        assert torch.equal(frozen(x), loaded(conv.state_dict())(x))
        assert torch.allclose(frozen(x), conv(x), atol=1e-12)
        conv.weight_breaking.normal_()
        frozen.load_state_dict(conv.state_dict())
        assert frozen.weight_breaking is not None and torch.equal(frozen(x), loaded(conv.state_dict())(x))
        assert torch.equal(frozen.state_dict()["weight_breaking"], loaded(conv.state_dict()).state_dict()["weight_breaking"])
        assert torch.allclose(frozen.state_dict()["weight_breaking"], conv.state_dict()["weight_breaking"], atol=1e-12)
        frozen.load_state_dict(strict.state_dict())  # a strict state drops it again
        assert frozen.weight_breaking is None
        assert torch.equal(frozen(x), loaded(strict.state_dict(), learnable=False)(x))


# -- the harmonic-domain convolution ---------------------------------------------------------------

@pytest.mark.parametrize("spec, stride, padding, dilation", [("D4", 1, 1, 1), ("O2", 2, 0, 1), ("D1", 1, 2, 2)])
def test_harmonic_domain_conv_equals_the_pixel_filter_conv(spec, stride, padding, dilation):
    """Training steps with few output pixels convolve against the ring harmonics; that must equal
    the convolution with the synthesised pixel filter, input, weight, bias and λ gradients too."""
    torch.manual_seed(0)
    G = get_group(spec)
    L = None if G.is_finite else 2
    conv = PEConv2d(G.field_type(2, L), G.field_type(33, L), 3, stride, padding, dilation).double()  # 66 field pairs: padded rows
    with torch.no_grad():
        conv.likelihood.coefficients.normal_()
        if conv.bias is not None:
            conv.bias.normal_()
    x = torch.randn(1, conv.in_channels, 5, 3, dtype=torch.float64, requires_grad=True)
    assert harmonic_conv.pays(conv, x)  # so forward takes the harmonic path
    results = []
    for run in (conv, lambda x: torch.nn.functional.conv2d(x, *conv.filter_and_bias(), stride, padding, dilation)):
        conv.zero_grad()
        x.grad = None
        y = run(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads = [p.grad.clone() for p in (x, conv.weight, conv.bias, conv.likelihood.coefficients) if p is not None]
        results.append([y.detach()] + grads)
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-10), float((a - b).abs().max())


def test_harmonic_domain_conv_compiles():
    """torch.compile of a training step through the harmonic path matches eager, gradients too."""
    torch.manual_seed(0)
    G = get_group("D4")
    conv = PEConv2d(G.field_type(4), G.field_type(8), 3, padding=1)
    x = torch.randn(2, conv.in_channels, 3, 3)
    assert harmonic_conv.pays(conv, x)
    results = []
    for run in (torch.compile(conv, backend="aot_eager"), conv):  # compiled first: empty caches
        conv.zero_grad()
        y = run(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), conv.weight.grad.clone(), conv.likelihood.coefficients.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_harmonic_domain_conv_trains_under_autocast():
    """A bf16 autocast training step through the harmonic path: bf16 output close to the float32
    one, and float32 gradients for the weight and λ."""
    torch.manual_seed(0)
    G = get_group("D4")
    conv = PEConv2d(G.field_type(4), G.field_type(8), 3, padding=1)
    x = torch.randn(2, conv.in_channels, 3, 3)
    assert harmonic_conv.pays(conv, x)
    ref = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), ref) < 5e-2
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and conv.weight.grad.abs().sum() > 0
    assert conv.likelihood.coefficients.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ["D4", "O2"])
def test_cuda_twirl_and_harmonic_path_match_the_cpu(spec):
    """The twirl's CUDA paths (D4: the regular frame's products and row gathers; O(2): the
    embedding_bag gathers and the per-sample-weights backward) and the harmonic-domain
    convolution give the CPU's outputs and gradients."""
    torch.manual_seed(0)
    G = get_group(spec)
    L = None if G.is_finite else 2
    conv = PEConv2d(G.field_type(2, L), G.field_type(8, L), 3, padding=1).double()
    with torch.no_grad():
        for t in (conv.likelihood.coefficients, conv.weight, conv.weight_breaking, conv.bias):
            if t is not None:
                t.normal_()
    x = torch.randn(1, conv.in_channels, 3, 3, dtype=torch.float64)
    assert harmonic_conv.pays(conv, x)
    results = []
    for device in ("cpu", "cuda"):
        conv = conv.to(device)
        conv.zero_grad()
        xd = x.to(device)
        outs = [conv.filter_and_bias()[0], conv(xd)]  # the second: harmonic path where it pays
        sum((o * o).sum() for o in outs).backward()
        params = [p.grad for p in (conv.weight, conv.weight_breaking, conv.likelihood.coefficients, conv.bias)
                  if p is not None]
        results.append([t.detach().cpu() for t in outs + params])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-9), float((a - b).abs().max())

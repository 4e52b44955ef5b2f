"""Core layers: equivariance at uniform λ, the kernel spaces, subgroups, caching, export, errors."""
import copy
import math

import numpy as np
import pytest
import torch
from escnn import nn as enn

import eqzoo
from eqzoo import GroupLikelihood
from eqzoo.groups import get_group
from eqzoo.nn import FieldBatchNorm2d, FourierReLU, NormReLU, PEConv2d, PELinear, field_relu
from eqzoo.nn import activation
from trained import generic_kernels

PIXEL_EXACT = [(0, 0.0), (0, math.pi / 2), (0, math.pi), (0, 3 * math.pi / 2),
               (1, 0.0), (1, math.pi / 2), (1, math.pi), (1, 3 * math.pi / 2)]


def pixel_elements(G):
    """Elements of G that act exactly on the pixel grid (90-degree rotations, flips)."""
    out = []
    for s, t in PIXEL_EXACT:
        if s and not G.has_flip:
            continue
        if G.is_finite and (t * G.n_rot / (2 * math.pi)) % 1:
            continue
        if G.spec == "D1" and t:
            continue
        out.append(G.element(s, t))
    return out


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def equivariance_errors(layer, fin, fout, x, elements):
    """Relative error of layer(g.x) vs g.layer(x) for each element, in order."""
    y = layer(x)
    errs = []
    for g in elements:
        gx = enn.GeometricTensor(x, fin).transform(g).tensor
        gy = enn.GeometricTensor(y, fout).transform(g).tensor
        errs.append(rel_err(layer(gx), gy))
    return errs


def kernel_space(layer) -> torch.Tensor:
    """Rows spanning the layer's filter space: the filters of every unit weight vector."""
    n = layer.weight.numel()
    rows = []
    with torch.no_grad():
        for i in range(n):
            layer.weight.zero_()
            layer.weight.view(-1)[i] = 1
            rows.append(layer.filter_and_bias()[0].flatten().clone())
    return torch.stack(rows)


def rank(m, tol=1e-8):
    return int(torch.linalg.matrix_rank(m.double(), atol=tol, rtol=0))


@pytest.mark.parametrize("spec", ["C4", "D4", "D8", "O2", "SO2", "D1"])
def test_uniform_likelihood_is_equivariant_on_the_pixel_grid(spec):
    torch.manual_seed(0)
    G = get_group(spec)
    fin, fout = G.field_type(2), G.field_type(3)
    conv = PEConv2d(fin, fout, 5, padding=2).double().eval()
    x = torch.randn(2, fin.size, 13, 13, dtype=torch.float64)
    errs = equivariance_errors(conv, fin, fout, x, pixel_elements(G))
    assert len(errs) >= 2
    assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize("spec,k", [("C4", 3), ("D4", 3), ("D8", 5), ("D1", 3), ("O2", 3), ("SO2", 5)])
def test_uniform_kernel_space_equals_escnn_strict_space(spec, k):
    G = get_group(spec)
    fin, fout = G.field_type(1), G.field_type(1)
    ours = kernel_space(PEConv2d(fin, fout, k, bias=False, likelihood=GroupLikelihood(G, learnable=False),
                                 basis="antialiased").double())
    r2 = enn.R2Conv(fin, fout, k, bias=False)
    theirs = []
    with torch.no_grad():
        for i in range(r2.weights.numel()):
            w = torch.zeros_like(r2.weights)
            w[i] = 1
            r2.weights.copy_(w)
            theirs.append(r2.expand_parameters()[0].flatten().double())
    theirs = torch.stack(theirs)
    r_ours, r_theirs = rank(ours, 1e-6), rank(theirs, 1e-6)
    assert r_ours == r_theirs > 0
    assert rank(torch.cat([ours, theirs]), 1e-6) == r_ours  # each spans the other


def test_trivial_input_fields_to_regular_fields():
    G = get_group("D4")
    fin, fout = G.trivial_type(3), G.field_type(4)
    conv = PEConv2d(fin, fout, 7, padding=3).double().eval()
    x = torch.randn(2, 3, 15, 15, dtype=torch.float64)
    assert max(equivariance_errors(conv, fin, fout, x, pixel_elements(G))) <= 1e-5


def _subgroup_layer(spec, in_subgroup):
    G = get_group(spec)
    lam = GroupLikelihood(G, learnable=False)
    lam.set_density(lambda s, t: np.where(in_subgroup(s, t), 1.0, 1e-9))
    fin, fout = G.field_type(2), G.field_type(2)
    torch.manual_seed(1)
    return G, fin, fout, generic_kernels(PEConv2d(fin, fout, 5, padding=2, likelihood=lam).double().eval())


def test_likelihood_uniform_on_rotations_gives_rotation_equivariance_only():
    G, fin, fout, conv = _subgroup_layer("D4", lambda s, t: s == 0)
    x = torch.randn(2, fin.size, 13, 13, dtype=torch.float64)
    errs = equivariance_errors(conv, fin, fout, x, [G.element(0, math.pi / 2), G.element(1, 0.0)])
    rot, flip = errs
    assert rot <= 1e-6 and flip > 1e-2, errs


@pytest.mark.parametrize("axis", [0.0, math.pi / 2, math.pi / 4])
def test_likelihood_uniform_on_a_reflection_subgroup_pins_the_convention(axis):
    # {e, (1, θ)} is a subgroup for every θ; a g/g⁻¹ or flip-order mix-up would give the
    # equivariance of (1, -θ) instead, a different reflection unless θ ∈ {0, π}.
    on = lambda s, t: (s == 0) & np.isclose(t, 0) | (s == 1) & np.isclose(t, axis)
    G, fin, fout, conv = _subgroup_layer("D8", on)
    x = torch.randn(2, fin.size, 13, 13, dtype=torch.float64)
    if axis == math.pi / 4:  # not on the pixel grid: compare on the kernel itself
        return _check_kernel_symmetry(conv, G, axis)
    errs = equivariance_errors(conv, fin, fout, x, [G.element(1, axis), G.element(1, -axis % (2 * math.pi)),
                                                   G.element(0, math.pi / 2)])
    own, mirrored, rot = errs
    assert own <= 1e-6, errs
    if axis:
        assert mirrored > 1e-2, errs
    assert rot > 1e-2, errs


def _check_kernel_symmetry(conv, G, axis):
    """κ(g x) = ρ_out(g) κ(x) ρ_in(g)ᵀ checked on the harmonic coefficients (exact for any θ)."""
    from eqzoo.kernels import ring_harmonics

    harm = ring_harmonics(conv.kernel_size)
    filt = conv.filter_and_bias()[0].detach()
    B = torch.tensor(harm.on_pixels()).reshape(harm.size, -1)
    coeff = torch.linalg.lstsq(B.T, filt.reshape(-1, B.shape[1]).T).solution.T.reshape(
        filt.shape[0], filt.shape[1], harm.size)
    for s, t, expect in [(1, axis, True), (1, -axis % (2 * math.pi), False)]:
        g = G.element(s, t)
        ro = torch.tensor(conv.out_type.representation(g))
        ri = torch.tensor(conv.in_type.representation(g))
        # κ(M⁻¹x) has coefficients coeff @ T(g) (ψ_h(M⁻¹x) = Σ T[h,k] ψ_k(x)); equivariance ⇔
        # ρ_out(g) κ(M⁻¹ x) ρ_in(g)ᵀ = κ(x)
        T = torch.tensor(harm.action(s, t))
        moved = torch.einsum("ab,bch,dc,hk->adk", ro, coeff, ri, T)
        err = rel_err(moved, coeff)
        assert (err <= 1e-6) if expect else (err > 1e-2), (s, t, err)


@pytest.mark.parametrize("spec,fields,expected", [("D1", 1, 2 * 2 * 6), ("D4", 1, 8 * 8 * 6), ("C4", 2, 8 * 8 * 6)])
def test_likelihood_at_identity_frees_the_kernel(spec, fields, expected):
    # 3x3 band-limited space per channel pair: ring 0 (frequency 0) + ring 1 (frequencies 0, 1, 2
    # as cos/sin) = 6 functions, so d_out * d_in * 6 dimensions in all.
    G = get_group(spec)
    lam = GroupLikelihood(G, learnable=False)
    lam.set_density(lambda s, t: np.where((s == 0) & np.isclose(t, 0), 1.0, 1e-12))
    conv = PEConv2d(G.field_type(fields), G.field_type(fields), 3, likelihood=lam, basis="antialiased").double()
    assert rank(kernel_space(conv), 1e-9) == expected


def test_o2_likelihood_kernel_weights_are_positive_and_normalised():
    lam = GroupLikelihood("O2", bandlimit=4, out_bandlimit=4)
    with torch.no_grad():
        lam.coefficients.normal_(0, 3.0)  # far from uniform: a sharply peaked λ
    for n in (13, 40, 997):
        w = lam.kernel_weights(n).detach()
        assert w.shape == (2 * n,)
        assert float(w.min()) >= -1e-7 * float(w.max())
        assert abs(float(w.sum()) - 1) < 1e-5
    dens = lam.grid_density().detach()
    assert abs(float(dens.mean()) - 1) < 1e-5 and float(dens.min()) > 0


def test_finite_density_and_set_density_round_trip():
    lam = GroupLikelihood("D4")
    target = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 3.0, 1.5])
    lam.set_density(target)
    got = lam.density(lam.group.elements()).double().detach().numpy()
    np.testing.assert_allclose(got, target / target.mean(), rtol=1e-5)
    assert lam.summary()["closest_subgroup"] in {"C1", "D1", "C2", "D2", "C4", "D4"}


def test_summary_finds_the_subgroup():
    lam = GroupLikelihood("D8")
    lam.set_density(lambda s, t: np.where((s == 0) & np.isclose(np.mod(t, np.pi / 2), 0), 1.0, 1e-3))
    assert lam.summary()["closest_subgroup"] == "C4"
    lam = GroupLikelihood("O2")
    assert lam.summary()["closest_subgroup"] == "O2"
    lam.set_density(lambda s, t: np.where(s == 0, 1.0, 1e-4))
    assert lam.summary()["closest_subgroup"] == "SO2"


def _tiny_model(spec="D4", likelihood=None):
    G = get_group(spec)
    a, b = G.field_type(2), G.field_type(3)
    lam1 = likelihood or GroupLikelihood(G)
    return torch.nn.Sequential(
        PEConv2d(G.trivial_type(1), a, 3, padding=1, likelihood=lam1), FieldBatchNorm2d(a), field_relu(a),
        PEConv2d(a, b, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        PELinear(b, G.trivial_type(4)))


def test_regularisers_at_init_and_non_negative():
    model = _tiny_model()
    total, parts = eqzoo.regularization(model)
    # at init the identity is the mode and every λ is the same small peak: only KL(λ_1 || U) is > 0
    assert float(parts["alignment"].detach()) == 0 and abs(float(parts["kl_chain"].detach())) < 1e-7
    assert 0 < float(parts["kl_uniform"].detach()) < 0.01
    with torch.no_grad():
        for lam in eqzoo.likelihoods(model).values():
            lam.coefficients.normal_(0, 1.0)
    total, parts = eqzoo.regularization(model)
    values = {k: float(v.detach()) for k, v in parts.items()}
    assert values["alignment"] >= 0 and values["kl_uniform"] >= -1e-7
    assert values["kl_chain"] >= -1e-7 and float(total.detach()) > 0
    total.backward()
    assert all(lam.coefficients.grad is not None for lam in eqzoo.likelihoods(model).values())
    with pytest.raises(ValueError, match="alignment"):
        eqzoo.regularization(model, alignment=-1)


def test_task_loss_alone_moves_the_likelihood():
    torch.manual_seed(0)
    model = _tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 1, 9, 9)
    x[:, :, :, :4] += 2  # an asymmetric input, so the logits are not invariant targets
    y = torch.randint(0, 4, (8,))
    before = {k: v.coefficients.detach().clone() for k, v in eqzoo.likelihoods(model).items()}
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + eqzoo.regularization(model, 0, 0, 0)[0]
        loss.backward()
        opt.step()
    moved = [float((v.coefficients.detach() - before[k]).abs().max()) for k, v in eqzoo.likelihoods(model).items()]
    assert max(moved) > 1e-4


# The panel's symmetries as kernel targets: (group of the layer, subgroup K of the teacher's λ as
# a predicate on (s, θ), number of rotations to probe for the continuous group).
LEARNABLE_SYMMETRIES = {
    "C4 in D4": ("D4", lambda s, t: s == 0),
    "D1 in D4": ("D4", lambda s, t: np.isclose(np.cos(t), 1.0)),
    "C1 in D4": ("D4", lambda s, t: (s == 0) & np.isclose(np.cos(t), 1.0)),
    "SO2 in O2": ("O2", lambda s, t: s == 0),
}


@pytest.mark.parametrize("case", list(LEARNABLE_SYMMETRIES))
def test_learns_the_symmetry_of_its_target(case):
    """Fit a layer to a target made by a kernel that is equivariant to a subgroup K only: λ must
    put more likelihood on K's elements than on every other element, and clearly more mass.

    The inputs are closed under the pixel-exact elements and the optimiser (SGD) commutes with the
    group's action on the coefficients, so the only asymmetry the student can learn is K's: its
    kernel starts equivariant and stays K-equivariant, and λ moves towards K. (On a random sample,
    λ also learns the sample's own asymmetries, i.e. it moves towards the identity.) λ uniform on
    a coset of K spans a conjugate kernel space, so the task alone cannot tell K from its cosets:
    the alignment term, which keeps the identity the mode, is what makes λ readable."""
    spec, in_k = LEARNABLE_SYMMETRIES[case]
    torch.manual_seed(0)
    G = get_group(spec)
    fin, fout = G.field_type(1), G.field_type(1)
    teacher_lam = GroupLikelihood(G, learnable=False)
    teacher_lam.set_density(lambda s, t: np.where(in_k(s, t), 1.0, 1e-9 if G.is_finite else 1e-3))
    teacher = generic_kernels(PEConv2d(fin, fout, 5, padding=2, likelihood=teacher_lam).eval())
    student = PEConv2d(fin, fout, 5, padding=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.03, momentum=0.9)
    x = torch.randn(2, fin.size, 12, 12)
    x = torch.cat([x] + [enn.GeometricTensor(x, fin).transform(g).tensor for g in pixel_elements(G)])
    with torch.no_grad():
        target = teacher(x)
    for _ in range(150):
        opt.zero_grad()
        reg, _ = eqzoo.regularization(student, alignment=5.0, kl_chain=0.0, kl_uniform=0.0)
        (torch.nn.functional.mse_loss(student(x), target) + reg).backward()
        opt.step()
    n_rot = G.n_rot if G.is_finite else 8
    s, t = np.repeat(np.arange(G.n_flip), n_rot), np.tile(np.arange(n_rot) * 2 * np.pi / n_rot, G.n_flip)
    lam = student.likelihood.density([G.element(int(a), float(b)) for a, b in zip(s, t)]).detach()
    inside = torch.as_tensor(in_k(s, t))
    assert lam[inside].min() > lam[~inside].max(), lam
    assert lam[inside].mean() > 1.5 * lam[~inside].mean(), lam


@pytest.mark.parametrize("target", ["plain", "equivariant"])
def test_uniform_likelihood_is_no_saddle(target):
    """λ leaves the group when the target has no symmetry, and stays near uniform when the target
    has all of it. (With a random non-equivariant kernel at init, or with λ exactly uniform and an
    equivariant kernel, λ's gradient would be noise or zero, and λ would stay where it started.)"""
    torch.manual_seed(0)
    G = get_group("D4")
    ftype = G.field_type(2)
    if target == "plain":
        teacher = torch.nn.Conv2d(ftype.size, ftype.size, 3, padding=1)
    else:
        teacher = generic_kernels(PEConv2d(ftype, ftype, 3, padding=1, likelihood=GroupLikelihood(G, learnable=False)))
    student = PEConv2d(ftype, ftype, 3, padding=1)
    lam = student.likelihood
    opt = torch.optim.Adam([{"params": [student.weight, student.bias]},
                            {"params": [lam.coefficients], "lr": 1e-2}], lr=1e-3)
    for _ in range(120):
        x = torch.randn(8, ftype.size, 10, 10)
        with torch.no_grad():
            y = teacher(x)
        opt.zero_grad()
        torch.nn.functional.mse_loss(student(x), y).backward()
        opt.step()
    kl = float(lam.kl_uniform())
    assert (kl > 0.5) if target == "plain" else (kl < 0.03), kl


def test_state_dict_cache_and_export():
    torch.manual_seed(0)
    G = get_group("D4")
    fin, fout = G.field_type(2), G.field_type(2)
    conv = PEConv2d(fin, fout, 3, padding=1)
    generic_kernels(conv)
    with torch.no_grad():
        conv.likelihood.coefficients.normal_()
        conv.bias.normal_()
    x = torch.randn(2, fin.size, 8, 8)
    keys_train = set(conv.train().state_dict())
    conv.eval()
    with torch.no_grad():
        y = conv(x)
    assert set(conv.state_dict()) == keys_train
    fresh = PEConv2d(fin, fout, 3, padding=1).eval()
    with torch.no_grad():
        fresh(x)  # fills its eval cache, which load_state_dict must invalidate
        fresh.load_state_dict(conv.state_dict())
        assert torch.allclose(fresh(x), y, atol=1e-6)
        assert rel_err(conv.export()(x), y) <= 1e-5
        conv.likelihood.coefficients.add_(0.5)  # changing λ invalidates the cache
        assert rel_err(conv(x), y) > 1e-4


def test_models_share_no_likelihood_unless_told():
    m1, m2 = _tiny_model(), _tiny_model()
    ids1 = {id(v) for v in eqzoo.likelihoods(m1).values()}
    ids2 = {id(v) for v in eqzoo.likelihoods(m2).values()}
    assert ids1.isdisjoint(ids2) and len(ids1) == 3
    shared = GroupLikelihood("D4")
    a, b = _tiny_model(likelihood=shared), _tiny_model(likelihood=shared)
    assert eqzoo.likelihoods(a)["0.likelihood"] is eqzoo.likelihoods(b)["0.likelihood"]


def test_dtype_device_autocast_and_compile():
    torch.manual_seed(0)
    model = _tiny_model().eval()
    x = torch.randn(2, 1, 9, 9)
    with torch.no_grad():
        y = model(x)
        assert model.double()(x.double()).dtype == torch.float64
        model.float()
        assert torch.allclose(model(x), y, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert rel_err(model(x).float(), y) < 5e-2
        half = _tiny_model().eval()
        half.load_state_dict(model.state_dict())
        assert rel_err(half.half()(x.half()).float(), y) < 1e-2
    compiled = torch.compile(model.train(), backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert out.shape == (2, 4)
    assert eqzoo.likelihoods(model)["0.likelihood"].coefficients.grad is not None


def test_double_backward_is_refused_clearly():
    """The twirl's backward is not itself differentiable: a second derivative must say so, not
    come out silently wrong."""
    G = get_group("D4")
    conv = PEConv2d(G.field_type(2), G.field_type(2), 3)
    y = conv(torch.randn(1, 16, 8, 8)).square().sum()
    (g,) = torch.autograd.grad(y, conv.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_bad_input_gives_clear_errors():
    G = get_group("D4")
    conv = PEConv2d(G.field_type(2), G.field_type(2), 3)
    with pytest.raises(ValueError, match="C = 16"):
        conv(torch.randn(1, 15, 8, 8))
    with pytest.raises(ValueError, match="different gspaces"):
        PEConv2d(G.field_type(1), get_group("C4").field_type(1), 3)
    with pytest.raises(ValueError, match="likelihood is over C4"):
        PEConv2d(G.field_type(1), G.field_type(1), 3, likelihood=GroupLikelihood("C4"))
    with pytest.raises(ValueError, match="accepted are"):
        get_group("D0")
    with pytest.raises(ValueError, match="accepted are"):
        GroupLikelihood("SO3")
    with pytest.raises(TypeError, match="FieldType"):
        PEConv2d(16, 16, 3)
    with pytest.raises(ValueError, match="positive"):
        GroupLikelihood("D4").set_density(np.zeros(8))
    with pytest.raises(ValueError, match="kernel_size"):
        PEConv2d(G.field_type(1), G.field_type(1), 0)


def test_field_batch_norm_output_takes_an_inplace_relu():
    """The norm's output is a fresh tensor, not a view (an in-place ReLU on a view would make
    autograd copy the activation twice); gradients through an in-place ReLU stay exact."""
    torch.manual_seed(0)
    bn = FieldBatchNorm2d(get_group("D4").field_type(3))
    x = torch.randn(4, 24, 5, 5, requires_grad=True)
    probe = torch.randn(4, 24, 5, 5)
    grads = []
    for inplace in (False, True):
        x.grad = None
        y = bn(x)
        assert y._base is None
        (torch.relu_(y) if inplace else torch.relu(y)).mul(probe).sum().backward()
        grads.append(x.grad.clone())
    assert torch.allclose(*grads, atol=1e-6)


@pytest.mark.parametrize("spec", ["D4", "O2"])
def test_field_batch_norm_follows_torch_batch_norm(spec):
    """momentum=None is the cumulative average, reset_running_stats clears the statistics, and
    track_running_stats=False always normalises with the batch's statistics, as nn.BatchNorm2d."""
    torch.manual_seed(0)
    ftype = get_group(spec).field_type(3)
    xs = [torch.randn(4, ftype.size, 5, 5) * (i + 1) + i for i in range(3)]
    bn = FieldBatchNorm2d(ftype, momentum=None).train()
    for x in xs:
        bn(x)
    ref = FieldBatchNorm2d(ftype, momentum=1.0).train()
    ref(torch.cat(xs))  # one batch holding all three: the cumulative average of the means
    assert int(bn.num_batches_tracked) == 3
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-5)
    bn.reset_running_stats()
    assert int(bn.num_batches_tracked) == 0 and bool((bn.running_var == 1).all()) and not bn.running_mean.any()
    free = FieldBatchNorm2d(ftype, track_running_stats=False).eval()
    assert free.running_mean is None and "running_mean" not in free.state_dict()
    y = free(xs[2])
    assert torch.allclose(y, FieldBatchNorm2d(ftype).train()(xs[2]), atol=1e-5)
    with pytest.raises(ValueError, match="track_running_stats=False has no nn.BatchNorm2d equivalent"):
        free.export()
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or None"):
        FieldBatchNorm2d(ftype, momentum=2)


@pytest.mark.parametrize("spec", ["D4", "O2"])
def test_field_batch_norm_eval_is_its_definition(spec):
    """In eval mode a field's invariant part is centred with the running mean, the whole field is
    divided by sqrt(running var + eps), then scaled and shifted (shift on the invariant part only);
    gradients reach the affine parameters (frozen-statistics fine-tuning)."""
    torch.manual_seed(0)
    ftype = get_group(spec).field_type(3)
    bn = FieldBatchNorm2d(ftype).double()
    with torch.no_grad():
        for t in (bn.running_mean, bn.bias):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
    bn.eval()
    x = torch.randn(2, ftype.size, 4, 4, dtype=torch.float64)
    # a permutation field keeps one mean per field, shared by its components; others keep the
    # coordinates of the mean in the orthonormal basis E of the invariant vectors
    E = torch.ones(bn.field_size, 1, dtype=torch.float64) if bn.permutation else bn._invariant.double()
    xf = x.view(2, bn.num_fields, bn.field_size, 16)
    centred = xf - (bn.running_mean @ E.T)[None, :, :, None]
    want = centred / torch.sqrt(bn.running_var + bn.eps)[None, :, None, None] * bn.weight[None, :, None, None] \
        + (bn.bias @ E.T)[None, :, :, None]
    y = bn(x)
    assert torch.allclose(y, want.view_as(x), atol=1e-12)
    y.sum().backward()
    assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", ["O2", "SO2"])
def test_field_batch_norm_training_is_its_definition(spec):
    """With batch statistics a general field is centred on the invariant projection of its
    per-channel means and divided by one standard deviation per field (over batch, components
    and pixels): outputs, input and parameter gradients, and the running statistics."""
    torch.manual_seed(0)
    ftype = get_group(spec).field_type(3)
    bn = FieldBatchNorm2d(ftype, momentum=1.0).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    x = (torch.randn(4, ftype.size, 5, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    E = bn._invariant.double()
    xf = x.view(4, bn.num_fields, bn.field_size, 25)
    mean = xf.mean(dim=(0, 3)) @ E
    centred = xf - (mean @ E.T)[None, :, :, None]
    var = centred.pow(2).mean(dim=(0, 2, 3))
    want = centred / torch.sqrt(var + bn.eps)[None, :, None, None] * bn.weight[None, :, None, None] \
        + (bn.bias @ E.T)[None, :, :, None]
    probe = torch.randn_like(x)
    results = []
    for y in (bn(x), want.view_as(x)):
        grads = torch.autograd.grad((y * probe).sum(), (x, bn.weight, bn.bias))
        results.append((y.detach(), *grads))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-10)
    n = x.numel() // bn.num_fields
    assert torch.allclose(bn.running_mean, mean.detach()) and torch.allclose(bn.running_var, var.detach() * n / (n - 1))
    assert torch.autograd.gradcheck(lambda t: bn(t), (x[:2, :, :3, :3].detach().clone().requires_grad_(),))


@pytest.mark.parametrize("spec", ["D4", "O2"])
@pytest.mark.parametrize("affine, track", [(True, True), (False, False)])
def test_field_batch_norm_is_the_same_in_every_layout_and_compiled(spec, affine, track):
    """A channels_last input, and torch.compile's path (per-channel statistics combined per
    field), give the same outputs, gradients and running statistics as the field views of a
    contiguous input; the compiled path keeps the input's layout."""
    torch.manual_seed(0)
    ftype = get_group(spec).field_type(3)
    ref = FieldBatchNorm2d(ftype, affine=affine, track_running_stats=track).double().train()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 2.0)
            ref.bias.normal_()
    x = torch.randn(4, ftype.size, 5, 6, dtype=torch.float64) * 3 + 1
    probe = torch.randn_like(x)

    def run(bn, t):
        t = t.detach().clone().requires_grad_()
        y = bn(t)
        params = [p for p in (bn.weight, bn.bias) if p is not None]
        grads = torch.autograd.grad((y * probe).sum(), [t] + params)
        return y, [y.detach(), *grads] + ([bn.running_mean.clone(), bn.running_var.clone()] if track else [])

    layouts, compiled = copy.deepcopy(ref), copy.deepcopy(ref)
    _, want = run(ref, x)
    _, got = run(layouts, x.to(memory_format=torch.channels_last))
    y, got_compiled = run(torch.compile(compiled, backend="aot_eager"), x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    for results in (got, got_compiled):
        assert len(results) == len(want)
        for a, b in zip(results, want):
            assert torch.allclose(a, b, atol=1e-10), float((a - b).abs().max())
    if track:  # eval: the running statistics, per channel
        compiled.eval(), ref.eval()
        assert torch.allclose(torch.compile(compiled, backend="aot_eager")(x), ref(x), atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nonlinearity", ["fourier", "norm", "gated"])
def test_cuda_field_norm_and_nonlinearities_match_the_cpu(monkeypatch, nonlinearity):
    """The O(2) layers' own autograd functions on CUDA (the general fields' batch norm with its
    fused backward reductions, the Fourier ReLU in one piece, the gated ReLU) give the CPU's
    outputs and gradients, where the CPU takes the Fourier ReLU a few fields at a time."""
    monkeypatch.setattr(activation, "_CHUNK_NUMBERS", 2 * 32 * 81)
    torch.manual_seed(0)
    ftype = get_group("O2").field_type(3)
    layers = torch.nn.Sequential(FieldBatchNorm2d(ftype), field_relu(ftype, nonlinearity)).double()
    x = torch.randn(4, ftype.size, 9, 9, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        layers = layers.to(device).train()
        layers.zero_grad()
        xd = x.to(device).requires_grad_()
        y = layers(xd)
        (y * y).sum().backward()
        results.append([t.detach().cpu() for t in [y, xd.grad] + [p.grad for p in layers.parameters()]])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-9), float((a - b).abs().max())


# -- nonlinearities of O(2)/SO(2) fields ------------------------------------------------------------

@pytest.mark.parametrize("spec", ["O2", "SO2"])
def test_field_nonlinearities_equivariance(spec):
    """Norm-ReLU and the gated ReLU commute with every element of the group, on and off the
    sampling grid; the Fourier ReLU only with its grid's (the 90-degree rotations and reflections)."""
    torch.manual_seed(0)
    G = get_group(spec)
    ftype = G.field_type(3)
    x = torch.randn(2, ftype.size, 4, 4, dtype=torch.float64)
    off_grid = [G.element(0, 0.7), G.element(0, 2.0)] + ([G.element(1, 0.3)] if spec == "O2" else [])
    on_grid = [G.element(0, math.pi / 2)] + ([G.element(1, 0.0)] if spec == "O2" else [])

    def errors(layer, elements):
        y = layer(x)
        return [rel_err(layer(enn.GeometricTensor(x, ftype).transform_fibers(g).tensor),
                        enn.GeometricTensor(y, ftype).transform_fibers(g).tensor) for g in elements]

    for nonlinearity in ("norm", "gated"):
        layer = field_relu(ftype, nonlinearity, dtype=torch.float64)
        assert max(errors(layer, on_grid + off_grid)) <= 1e-10, nonlinearity
        assert rel_err(layer(x), x) > 0.1  # not the identity
        assert torch.autograd.gradcheck(layer, (x[:1, :, :2, :2].clone().requires_grad_(),))
    fourier = field_relu(ftype, dtype=torch.float64)
    assert max(errors(fourier, on_grid)) <= 1e-10
    assert max(errors(fourier, off_grid)) > 1e-3


@pytest.mark.parametrize("chunk_numbers", [None, 1, 3 * 32 * 20])
def test_fourier_relu_is_sample_relu_project(monkeypatch, chunk_numbers):
    """The definition, in one chunk and in several (one field per chunk; 3 fields per chunk with
    a shorter last one): training and eval paths, values and gradients."""
    if chunk_numbers is not None:
        monkeypatch.setattr(activation, "_CHUNK_NUMBERS", chunk_numbers)
    ftype = get_group("O2").field_type(2)
    layer = FourierReLU(ftype, dtype=torch.float64)
    x = torch.randn(4, ftype.size, 5, 4, dtype=torch.float64)
    xf = x.view(4, 2, ftype.size // 2, 5, 4)
    want = torch.einsum("dn,bfnhw->bfdhw", layer._project, torch.einsum("nd,bfdhw->bfnhw", layer._sample, xf).relu())
    with torch.no_grad():
        assert torch.allclose(layer(x), want.reshape(x.shape), atol=1e-12)
    assert torch.allclose(layer(x.clone().requires_grad_()), want.reshape(x.shape), atol=1e-12)
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(),))


def test_fourier_relu_compiles_as_one_operator(monkeypatch):
    """Under torch.compile the training path stays one operator (eqzoo::sampled_relu, chunks
    and all, with its own backward) and gives eager's values and gradients."""
    monkeypatch.setattr(activation, "_CHUNK_NUMBERS", 3 * 32 * 20)  # several chunks
    torch.manual_seed(0)
    ftype = get_group("O2").field_type(4)
    layer = FourierReLU(ftype, dtype=torch.float64)
    x = torch.randn(2, ftype.size, 5, 4, dtype=torch.float64)
    probe = torch.randn_like(x)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    results = []
    for run in (torch.compile(layer, backend=backend), layer):
        t = x.clone().requires_grad_()
        y = run(t)
        (y * probe).sum().backward()
        results.append((y.detach(), t.grad))
    ops = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert "eqzoo.sampled_relu.default" in ops and not any("bmm" in op or "matmul" in op for op in ops), ops
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-12)


def test_norm_relu_definition_and_gradients():
    """Each 2-d (or 1-d non-trivial) irrep block is scaled by relu(|x| - b) / |x|, the invariant
    component goes through a ReLU; thresholds start where about half of unit-normal blocks pass."""
    torch.manual_seed(0)
    ftype = get_group("O2").field_type(2)  # irreps: trivial, sign, then 2-d blocks
    layer = NormReLU(ftype, dtype=torch.float64)
    assert layer.trivial == [0] and layer.blocks[0] == (1, 1) and all(s == 2 for _, s in layer.blocks[1:])
    assert abs(float(layer.bias.detach()[0, 1]) - math.sqrt(2 * math.log(2))) < 1e-12
    x = torch.randn(2, ftype.size, 3, 3, dtype=torch.float64)
    y = layer(x).view(2, 2, -1, 3, 3)
    xf = x.view(2, 2, -1, 3, 3)
    assert torch.equal(y[:, :, 0], xf[:, :, 0].relu())
    start, size = layer.blocks[2]
    block = xf[:, :, start:start + size]
    norm = block.norm(dim=2, keepdim=True)
    want = block * torch.relu(norm - layer.bias[None, :, 2, None, None, None]) / norm
    assert torch.allclose(y[:, :, start:start + size], want, atol=1e-12)
    passed = float((torch.randn(100000, 2).norm(dim=1) > layer.bias.detach()[0, 1].float()).float().mean())
    assert abs(passed - 0.5) < 0.01
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(),))


def test_field_nonlinearity_refuses_permutation_fields():
    with pytest.raises(ValueError, match="channel-wise ReLU"):
        field_relu(get_group("D4").field_type(2), "norm")
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        field_relu(get_group("O2").field_type(2), "swish")

"""Interpretability: plots of the learnt λ, the degree-of-equivariance table and the measured
equivariance error next to λ."""

import math
import pytest
import timm
import torch
from matplotlib.figure import Figure

import eqzoo
import eqzoo.hub as hub
from eqzoo.analysis import degree_of_equivariance, equivariance_error, format_table, pixel_elements
from eqzoo.likelihood import GroupLikelihood
from eqzoo.viz import plot_likelihoods


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a learnt head: invariant at uniform λ, like every other layer (the default head is a plain nn.Linear)
    return timm.create_model("pe_resnet18", group="D4", num_classes=4, head="learnt").eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(0))  # 33 = 2^5 + 1: centred maps


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_plot_model_small_multiples(model, tmp_path):
    fig = plot_likelihoods(model, tmp_path / "p.png")
    assert isinstance(fig, Figure)
    n = len(eqzoo.likelihoods(model))
    panels = _panels(fig)
    assert len(panels) == n
    # D4: a rotation and a reflection curve (closed: 4 + 1 points) and the uniform line in every panel
    lines = panels[0].get_lines()
    assert len(lines) == 3 and len(lines[0].get_xdata()) == 5
    assert {t.get_text() for t in panels[0].get_legend().get_texts()} >= {"rotations", "reflections"}
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_continuous_and_loaded_likelihoods(tmp_path):
    lam = GroupLikelihood("O2")
    lam.set_density(lambda s, t: 1.0 + 0.8 * (1 - s) * __import__("numpy").cos(t))
    fig = plot_likelihoods({"a": lam, "b": GroupLikelihood("SO2")})
    a, b = _panels(fig)
    assert len(a.get_lines()) == 3 and len(b.get_lines()) == 2  # SO2 has no reflections
    assert max(a.get_lines()[0].get_ydata()) > 1.5  # peaked at the identity
    record = hub.likelihood_record({"a": lam})
    assert len(_panels(plot_likelihoods(record))) == 1


def test_degree_of_equivariance_table(model):
    rows = degree_of_equivariance(model)
    assert len(rows) == len(eqzoo.likelihoods(model))
    assert rows[0]["layer"] == "conv1" and rows[0]["group"] == "D4"
    # at init every λ is the same small peak at the identity: close to uniform, read as all of D4
    assert all(0 < r["kl_uniform"] < 0.01 and r["closest_subgroup"] == "D4" for r in rows)
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| layer | group | kl_uniform | mass_near_identity | closest_subgroup |"
    assert len(lines) == len(rows) + 2 and lines[2].startswith("| conv1 | D4 | 0.00")
    shared = {"l": eqzoo.likelihoods(model)["conv1.likelihood"]}
    shared["l"].layers = ["a", "b", "c"]
    assert degree_of_equivariance(shared)[0]["layer"] == "a … c (3 layers)"
    del shared["l"].layers


def test_pixel_elements():
    assert [e[0] for e in pixel_elements("D4")] == ["rot90", "rot180", "rot270", "flip", "flip∘rot90",
                                                     "flip∘rot180", "flip∘rot270"]
    assert [e[0] for e in pixel_elements("C2")] == ["rot180"]
    assert [e[0] for e in pixel_elements("D1")] == ["flip"]
    assert [e[0] for e in pixel_elements("O2")][:3] == ["rot90", "rot180", "rot270"]
    assert pixel_elements("C3") == []


def test_equivariance_error_follows_lambda(model, x):
    rows = equivariance_error(model, x)
    out = [r for r in rows if r["layer"] == "output"]
    # a fresh model is exactly equivariant: its kernels start equivariant, whatever λ is
    assert len(out) == 7 and all(r["error"] < 1e-4 for r in rows)
    conv1 = [r for r in rows if r["layer"] == "conv1"]
    init = conv1[0]["likelihood"]
    assert len(conv1) == 7 and 0.9 < init < 1 and all(r["likelihood"] == pytest.approx(init) for r in conv1)
    lam = eqzoo.likelihoods(model)["conv1.likelihood"]
    saved = [t.detach().clone() for t in (lam.coefficients, model.conv1.weight)]
    try:
        with torch.no_grad():  # a kernel with a non-equivariant part, as training leaves it
            model.conv1.weight.normal_(0, float(model.conv1.weight.std()))
        lam.set_density(lambda s, t: 1e-3 + 20.0 * ((s == 0) & (t == 0)))  # conv1: (almost) no symmetry
        broken = equivariance_error(model, x, elements=["rot90"])
    finally:
        with torch.no_grad():
            lam.coefficients.copy_(saved[0])
            model.conv1.weight.copy_(saved[1])
    err = {r["layer"]: r for r in broken}
    assert err["conv1"]["likelihood"] < 0.01 and err["conv1"]["error"] > 0.1
    assert err["output"]["error"] > 1e-3
    assert err["layer1.0.conv1"]["likelihood"] == pytest.approx(init)  # its own λ is as at init...
    assert model.training is False
    with pytest.raises(ValueError, match="do not act exactly"):
        equivariance_error(model, x, elements=["rot45"])


def test_head_invariance_names_the_symmetry_of_a_plain_head():
    """A plain head made invariant to C4 (averaged over the rotations' permutations of the pooled
    fields) reads as C4, and its logits are then invariant to 90-degree rotations of the input."""
    torch.manual_seed(0)
    model = timm.create_model("pe_resnet18", num_classes=3, layers=[1, 1, 1, 1], channels=[16, 16, 32, 32],
                              stem_width=16, zero_init_last=False).double().eval()
    assert isinstance(model.fc, torch.nn.Linear)
    G, ftype = model.group, model.feature_type
    out = eqzoo.head_invariance(model)
    assert out["closest_subgroup"] == "C1" and out["scores"]["rot0"] == pytest.approx(1.0)
    rots = [torch.as_tensor(ftype.representation(G.element(0, k * math.pi / 2)), dtype=torch.float64)
            for k in range(4)]
    with torch.no_grad():
        model.fc.weight.copy_(sum(model.fc.weight @ r for r in rots) / 4)
    out = eqzoo.head_invariance(model)
    assert out["closest_subgroup"] == "C4", out
    assert out["scores"]["rot90"] == pytest.approx(1.0) and out["scores"]["flip∘rot0"] < 0.9
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(torch.rot90(x, 1, (2, 3))), model(x), atol=1e-8)
    with pytest.raises(ValueError, match="plain nn.Linear head"):
        eqzoo.head_invariance(timm.create_model("pe_resnet18", head="learnt", num_classes=3))


def test_likelihood_record_round_trip():
    lam = GroupLikelihood("D4")
    lam.set_density(lambda s, t: 1.0 + 0.5 * (1 - s) * __import__("numpy").cos(t))
    record = lam.to_record(["layer1.0.conv1", "layer1.0.conv2"])
    again = GroupLikelihood.from_record(record)
    assert torch.equal(again.coefficients, lam.coefficients.detach())
    assert again.layers == record["layers"] and again.to_record(again.layers) == record
    with pytest.raises(eqzoo.errors.HubConfigError, match="λ of conv1 has no 'group'"):
        GroupLikelihood.from_record({k: v for k, v in record.items() if k != "group"}, "λ of conv1")


def test_kernel_invariance_reads_the_kernel_not_lambda():
    """A fresh model's kernels are D4-invariant whatever λ is; a generic kernel under λ uniform on
    the rotations reads C4; one under λ at the identity reads C1."""
    import numpy as np
    from trained import generic_kernels

    torch.manual_seed(0)
    model = timm.create_model("pe_resnet18", layers=[1, 1, 1, 1], channels=[16, 16, 32, 32], stem_width=16,
                              num_classes=3)
    fresh = eqzoo.kernel_invariance(model)
    assert set(fresh) >= {"conv1", "layer1.0.conv1", "layer4.0.conv2"}
    assert all(r["closest_subgroup"] == "D4" and min(r["scores"].values()) > 1 - 1e-5 for r in fresh.values())
    for name, density in (("layer1.0.conv1", lambda s, t: np.where(s == 0, 1.0, 1e-9)),
                          ("layer2.0.conv1", lambda s, t: np.where((s == 0) & np.isclose(t, 0), 1.0, 1e-9))):
        conv = model.get_submodule(name)
        generic_kernels(conv)
        conv.likelihood.set_density(density)
    read = eqzoo.kernel_invariance(model)
    c4 = read["layer1.0.conv1"]["scores"]
    assert read["layer1.0.conv1"]["closest_subgroup"] == "C4" and c4["rot90"] > 1 - 1e-5 and c4["flip∘rot0"] < 0.5
    assert read["layer2.0.conv1"]["closest_subgroup"] == "C1"
    assert read["layer3.0.conv1"]["closest_subgroup"] == "D4"
    with pytest.raises(ValueError, match="finite group"):
        eqzoo.kernel_invariance(timm.create_model("resnet18", num_classes=3))

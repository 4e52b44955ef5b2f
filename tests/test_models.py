"""The model zoo: registration, timm's model contract, invariance at init, learnt symmetry
breaking, export into timm's own classes, and argument errors.

Every registered model is built once (a module-scoped fixture, so that pytest runs each model's
tests together and frees it after) and checked at a tiny input; invariance is checked on odd
input sizes (65 for the ResNets, 33 for the WRNs), where every stride-2 layer samples a grid
centred on the image, so that rotating / flipping the image permutes the sampling points exactly.
"""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import eqzoo
from eqzoo.models import PEResNet, PEWideResNet, WideResNet
from eqzoo.nn import FieldBatchNorm2d, PEConv2d, PELinear
from trained import trained_looking

ROOT = Path(__file__).resolve().parents[1]

RESNETS = ["pe_resnet18", "pe_resnet34", "pe_resnet50", "pe_resnet101", "pe_wide_resnet50_2", "pe_wide_resnet101_2"]
WRNS = ["pe_wrn16_8", "pe_wrn28_10"]
ALL_MODELS = RESNETS + WRNS
COUNTERPART = {name: name[3:] for name in RESNETS}
NUM_CLASSES, IN_CHANS = 3, 2


def tiny_input(name, batch=2, dtype=torch.float32):
    size = 32 if name in RESNETS else 16  # the total reduction: 1x1 after the last stage of a ResNet
    return torch.randn(batch, IN_CHANS, size, size, dtype=dtype)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=ALL_MODELS)
def built(request):
    torch.manual_seed(0)
    model = timm.create_model(request.param, num_classes=NUM_CLASSES, in_chans=IN_CHANS)
    trained_looking(model, 0.3)  # non-uniform likelihoods, so that export has something to carry
    return request.param, model


# The tests of one model share its instance and run in this file's order: test_forward_backward
# trains one step (batch-norm statistics become non-trivial), the eval-mode tests after it reuse
# the cached filters, test_reset_classifier comes last as it replaces the head.


# -- registry --------------------------------------------------------------------------------------

def test_registered_through_timm():
    assert sorted(timm.list_models("pe_*")) == sorted(ALL_MODELS)
    for name in ALL_MODELS:
        cfg = timm.get_pretrained_cfg(name).to_dict()
        for key in ("input_size", "mean", "std", "crop_pct", "pool_size", "first_conv", "classifier",
                    "num_classes", "license"):
            assert key in cfg, (name, key)
    assert timm.get_pretrained_cfg("pe_wrn16_8").input_size == (3, 32, 32)


# -- every model: timm's contract ----------------------------------------------------------------------

def test_forward_backward(built):
    name, model = built
    # every layer is an eqzoo layer but the default plain head of a learnt-λ model
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d) for n, m in model.named_modules() if n != "fc")
    assert isinstance(model.conv1, PEConv2d) and type(model.fc) is nn.Linear
    assert model.conv1.in_channels == IN_CHANS and model.fc.out_features == NUM_CLASSES
    model.train()
    model.zero_grad(set_to_none=True)
    x = tiny_input(name)
    y = model(x)
    assert y.shape == (2, NUM_CLASSES)
    y.square().sum().backward()
    lams = eqzoo.likelihoods(model)
    assert lams and all(lam.coefficients.grad is not None for lam in lams.values())
    assert model.conv1.weight.grad is not None


def test_features_and_intermediates(built):
    name, model = built
    model.eval()
    x = tiny_input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features == model.feature_type.size
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-5)
        final, inter = model.forward_intermediates(x)
        assert len(inter) == len(model.feature_info)
        for t, info in zip(inter, model.feature_info):
            assert t.shape[1] == info["num_chs"]
            assert x.shape[-1] // t.shape[-1] == info["reduction"]
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape for t in only] == [t.shape for t in inter[-2:]]
    assert model.get_classifier() is model.fc
    assert set(model.group_matcher()) == {"stem", "blocks"}
    # timm's feature wrapper over this very instance (what features_only=True builds)
    feat_net = timm.models.FeatureListNet(model, out_indices=tuple(range(len(model.feature_info))))
    with torch.no_grad():
        outs = feat_net(x)
    assert [o.shape for o in outs] == [t.shape for t in inter]
    assert feat_net.feature_info.channels() == [i["num_chs"] for i in model.feature_info]


def test_fx_feature_extraction(built):
    name, model = built
    model.eval()
    nodes = {info["module"]: f"feat{i}" for i, info in enumerate(model.feature_info)}
    nodes["fc"] = "logits"
    extractor = create_feature_extractor(model, return_nodes=nodes, tracer_kwargs=eqzoo.models.fx_tracer_kwargs())
    x = tiny_input(name)
    with torch.no_grad():
        out = extractor(x)
        _, inter = model.forward_intermediates(x)
        assert torch.allclose(out["logits"], model(x), atol=1e-5)
    for i, t in enumerate(inter):
        assert torch.allclose(out[f"feat{i}"], t, atol=1e-5)


def test_export_round_trip(built):
    name, model = built
    model.eval()
    plain = eqzoo.export(model)
    if name in RESNETS:
        assert type(plain) is timm.models.resnet.ResNet
        reference = timm.create_model(COUNTERPART[name], num_classes=NUM_CLASSES, in_chans=IN_CHANS)
    else:
        assert type(plain) is WideResNet
        depth, k = (16, 8) if name == "pe_wrn16_8" else (28, 10)
        reference = WideResNet(depth, k, num_classes=NUM_CLASSES, in_chans=IN_CHANS)
    assert not any(isinstance(m, (PEConv2d, PELinear, FieldBatchNorm2d)) for m in plain.modules())
    reference.load_state_dict(plain.state_dict(), strict=True)
    reference.eval()
    x = tiny_input(name)
    with torch.no_grad():
        y = model(x)
        assert rel_err(plain(x), y) <= 1e-5
        assert rel_err(reference(x), y) <= 1e-5
    assert isinstance(model.conv1, PEConv2d)  # the model itself is untouched


def test_reset_classifier(built):
    name, model = built
    model.eval()
    x = tiny_input(name)
    model.reset_classifier(5)
    assert isinstance(model.fc, (PELinear, nn.Linear)) and model.num_classes == 5
    with torch.no_grad():  # (with gradients, every filter would be synthesised again)
        assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert isinstance(model.fc, nn.Identity)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


def test_pruned_intermediates():
    model = timm.create_model("pe_resnet18", num_classes=NUM_CLASSES).eval()
    kept = model.prune_intermediate_layers(indices=[0, 1, 2])  # the stem, layer1, layer2
    x = torch.randn(1, 3, 32, 32)
    feats = model.forward_intermediates(x, indices=kept, intermediates_only=True)
    assert feats[-1].shape[1] == model.feature_info[2]["num_chs"] == model.feature_type.size
    assert isinstance(eqzoo.export(model), PEResNet)  # no timm counterpart for a pruned tree


def _check_grad_checkpointing(model, x):
    """Checkpointed training forward equals the plain one, and gradients flow to the stem."""
    model.train()
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    assert torch.allclose(out, ref, atol=1e-5) and model.conv1.weight.grad is not None


def test_wrn_pruning_and_checkpointing():
    torch.manual_seed(0)
    model = timm.create_model("pe_wrn16_8", num_classes=NUM_CLASSES)
    x = torch.randn(2, 3, 16, 16)
    _check_grad_checkpointing(model, x)
    model.eval()
    kept = model.prune_intermediate_layers(indices=[1, 2])
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=kept, intermediates_only=True)
    assert [f.shape[1] for f in feats] == [128, 256] and model.feature_type.size == 256


# -- options -----------------------------------------------------------------------------------------------

def test_timm_training_options():
    model = timm.create_model("pe_resnet18", num_classes=4, drop_rate=0.2, drop_path_rate=0.1,
                              global_pool="catavgmax").eval()
    assert model.drop_rate == 0.2
    assert sum(type(m).__name__ == "DropPath" for m in model.modules()) == 7  # all blocks but the first
    assert model.fc.in_features == 2 * model.num_features == model.head_hidden_size
    x = torch.randn(2, 3, 33, 33)
    plain = eqzoo.export(model)  # timm's resnet18 with the same global pool and classifier width
    assert type(plain) is timm.models.resnet.ResNet and plain.global_pool.pool_type == "catavgmax"
    with torch.no_grad():
        assert rel_err(plain(x), model(x)) <= 1e-5
    model.train()
    model(x).sum().backward()


def test_features_only_keeps_likelihoods():
    expected = {"layer": 20, "stage": 5, "model": 1}  # 20 convs; stem + 4 stages; one
    for share, n in expected.items():
        full = timm.create_model("pe_resnet18", num_classes=4, share_likelihood=share, head="learnt")
        feats = timm.create_model("pe_resnet18", features_only=True, share_likelihood=share, out_indices=(1, 2, 3, 4))
        assert len(eqzoo.likelihoods(feats)) == n
        assert len(eqzoo.likelihoods(full)) == n + (share == "layer")  # + the head's own
        if share != "layer":  # the head shares the last stage's (or the model's) likelihood
            assert full.fc.likelihood is full.layer4[-1].conv2.likelihood
            full.reset_classifier(7)
            assert full.fc.likelihood is full.layer4[-1].conv2.likelihood
        outs = feats(torch.randn(2, 3, 32, 32))
        assert [o.shape[1] for o in outs] == feats.feature_info.channels() == [64, 128, 256, 512]
        assert feats.feature_info.reduction() == [4, 8, 16, 32]
    wrn = timm.create_model("pe_wrn16_8", features_only=True, share_likelihood="stage")
    assert len(eqzoo.likelihoods(wrn)) == 4
    assert [o.shape[1] for o in wrn(torch.randn(2, 3, 16, 16))] == [16, 128, 256, 512]


def test_timm_fx_features_only():
    feats = timm.create_model("pe_resnet18", features_only=True, feature_cls="fx", out_indices=(2, 4))
    assert [o.shape[1] for o in feats(torch.randn(1, 3, 32, 32))] == [128, 512]


def test_strict_variant_same_architecture():
    """The strict model is the learnt one with λ frozen and no symmetry-breaking κ_1 (the same
    state_dict otherwise, with the same head kind)."""
    strict = timm.create_model("pe_resnet18", num_classes=4, learn_likelihood=False)
    learnt = timm.create_model("pe_resnet18", num_classes=4, head="learnt")
    keys = set(learnt.state_dict())
    breaking = {k for k in keys if k.endswith(".weight_breaking")}
    assert breaking and set(strict.state_dict()) == keys - breaking
    assert not any(lam.learnable for lam in eqzoo.likelihoods(strict).values())
    assert all(lam.learnable for lam in eqzoo.likelihoods(learnt).values())


@pytest.mark.parametrize("group, fields", [("D8", 4), ("C4", 16), ("D1", 32), ("C8", 8)])
def test_widths_are_timms(group, fields):
    model = timm.create_model("pe_resnet18", group=group, num_classes=4)
    assert len(model.conv1.out_type) == fields and model.conv1.out_channels == 64
    assert model.num_features == 512
    reference = timm.create_model("resnet18", num_classes=4)
    assert sum(p.numel() for p in eqzoo.export(model).parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("nonlinearity", ["auto", "norm", "gated"])
def test_continuous_group_rounds_widths_and_exports(nonlinearity):
    model = timm.create_model("pe_resnet18", group="O2", num_classes=4, nonlinearity=nonlinearity).eval()
    size = model.conv1.out_type.representations[0].size
    assert size == 14 and model.conv1.out_channels == 70  # 64 -> 5 fields of 14
    assert all(info["num_chs"] % size == 0 for info in model.feature_info)
    x = torch.randn(2, 3, 33, 33)
    plain = eqzoo.export(model)  # no timm counterpart (FourierReLU): a copy with plain convs
    assert not any(isinstance(m, (PEConv2d, PELinear, FieldBatchNorm2d)) for m in plain.modules())
    with torch.no_grad():
        assert rel_err(plain(x), model(x)) <= 1e-5
        assert rel_err(torch.jit.script(plain)(x), model(x)) <= 1e-5  # the nonlinearities script
    with pytest.raises(ValueError, match="counterpart"):
        eqzoo.export(model, counterpart=True)


@pytest.mark.parametrize("nonlinearity", ["fourier", "norm", "gated"])
def test_continuous_group_trains_under_autocast(nonlinearity):
    """bf16 autocast through the O(2) layers' own autograd functions (Fourier ReLU, batch norm):
    outputs near float32's, finite float32 gradients for every parameter."""
    torch.manual_seed(0)
    model = timm.create_model("pe_resnet18", group="O2", num_classes=3, layers=[1, 1, 1, 1],
                              nonlinearity=nonlinearity).train()
    x = torch.randn(2, 3, 33, 33)
    y = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = model(x)
    assert rel_err(y_amp.float(), y) < 0.1
    y_amp.float().square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_grad_checkpointing_channels_last_amp_compile():
    torch.manual_seed(0)
    model = timm.create_model("pe_resnet18", num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    _check_grad_checkpointing(model, x)
    model.set_grad_checkpointing(False)
    model.eval()
    with torch.no_grad():
        y = model(x)
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        assert torch.allclose(model_cl(x.to(memory_format=torch.channels_last)), y, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_amp = model(x)
        assert y_amp.dtype == torch.bfloat16 and rel_err(y_amp.float(), y) < 0.1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        assert torch.allclose(compiled(x), y, atol=1e-4)


# -- invariance at init, and learnt breaking -----------------------------------------------------------------

# (image transform, which groups contain it): rotations by 90 degrees and the flips escnn uses
TRANSFORMS = {
    "rot90": (lambda x: torch.rot90(x, 1, (2, 3)), {"D4", "D8", "C4", "C8"}),
    "rot180": (lambda x: torch.rot90(x, 2, (2, 3)), {"D4", "D8", "C4", "C8"}),
    "rot270": (lambda x: torch.rot90(x, 3, (2, 3)), {"D4", "D8", "C4", "C8"}),
    "hflip": (lambda x: torch.flip(x, (3,)), {"D4", "D8", "D1"}),
    "vflip": (lambda x: torch.flip(x, (2,)), {"D4", "D8"}),
}


def invariance_errors(model, x):
    model.eval()
    with torch.no_grad():
        y = model(x)
        return {k: rel_err(model(t(x)), y) for k, (t, _) in TRANSFORMS.items()}


@pytest.mark.parametrize("name, group, size", [
    ("pe_resnet18", "D4", 65), ("pe_resnet18", "D8", 65), ("pe_resnet18", "C4", 65),
    ("pe_resnet18", "D1", 65), ("pe_wrn16_8", "D4", 33),
])
def test_invariant_at_init(name, group, size):
    """With a head that is invariant at uniform λ ("learnt"), a model at init is invariant."""
    torch.manual_seed(0)
    kwargs = dict(zero_init_last=False) if name in RESNETS else {}  # else residual branches start at 0
    model = timm.create_model(name, group=group, num_classes=4, head="learnt", **kwargs).double()
    errors = invariance_errors(model, torch.randn(2, 3, size, size, dtype=torch.float64))
    for k, (_, groups) in TRANSFORMS.items():
        if group in groups:
            assert errors[k] <= 1e-4, (k, errors)
    if group == "C4":  # a transformation outside the group is not a symmetry of the model
        assert errors["hflip"] > 1e-3


@pytest.mark.parametrize("head", ["plain", "learnt", "invariant"])
def test_heads_export_into_timm(head):
    """Every head option exports into timm's ``fc``: the exported state_dict loads into
    ``resnet18`` with strict=True and gives the model's outputs."""
    torch.manual_seed(0)
    arch = dict(layers=[1, 1, 1, 1], channels=[64, 64, 128, 128], num_classes=7)
    model = timm.create_model("pe_resnet18", head=head, **arch).eval()
    assert isinstance(model.fc, nn.Linear if head == "plain" else PELinear)
    if head == "invariant":
        assert not model.fc.likelihood.learnable
    reference = timm.create_model("resnet18", **arch).eval()
    reference.load_state_dict(eqzoo.export(model).state_dict(), strict=True)
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        assert rel_err(reference(x), model(x)) <= 1e-5


@pytest.mark.parametrize("head", ["invariant", "learnt"])
def test_field_heads_start_with_logits_as_small_as_timms(head):
    """A PELinear head starts with logits on the scale of timm's ``nn.Linear`` over the same pooled
    features (an invariant head's filter adds the positive means of each field's components)."""
    torch.manual_seed(0)
    arch = dict(layers=[1, 1, 1, 1], channels=[64, 64, 128, 128], num_classes=10, in_chans=1)
    x = torch.rand(32, 1, 33, 33)
    model = timm.create_model("pe_resnet18", head=head, **arch).train()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        plain = nn.Linear(feats.shape[1], 10)  # timm's fc, with its default init
        ratio = float(model.fc(feats).std() / plain(feats).std())
    assert 0.4 < ratio < 2.5, ratio


def test_head_defaults():
    """``head="auto"``: a plain head for learnt-λ models, an invariant one for strict models, which
    stay invariant with it; a plain head lets a model tell a digit from its rotated copy at init."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 65, 65, dtype=torch.float64)
    strict = timm.create_model("pe_resnet18", num_classes=4, learn_likelihood=False, zero_init_last=False).double()
    assert isinstance(strict.fc, PELinear) and not strict.fc.likelihood.learnable
    assert max(invariance_errors(strict, x).values()) <= 1e-4
    learnt = timm.create_model("pe_resnet18", num_classes=4, zero_init_last=False).double()
    assert type(learnt.fc) is nn.Linear
    assert invariance_errors(learnt, x)["rot90"] > 1e-3
    learnt.reset_classifier(9)
    assert type(learnt.fc) is nn.Linear and learnt.fc.out_features == 9


@pytest.mark.parametrize("learn", [True, False])
def test_learnt_likelihood_breaks_invariance(learn):
    """A loss that asks rotated copies for different classes: only λ can serve it."""
    torch.manual_seed(0)
    model = timm.create_model("pe_resnet18", num_classes=2, learn_likelihood=learn, zero_init_last=False).double()
    x = torch.randn(2, 3, 65, 65, dtype=torch.float64)
    inputs = torch.cat([x, torch.rot90(x, 1, (2, 3))])
    target = torch.tensor([0, 0, 1, 1])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(inputs), target).backward()
        opt.step()
    err = invariance_errors(model, x)["rot90"]
    if learn:
        assert err > 1e-3
    else:
        assert err <= 1e-4


# -- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(group="D5"), r"D5.*do not divide.*D1, D2, D4, D8"),
    (dict(group="X3"), r"unknown group .*O2"),
    (dict(share_likelihood="block"), r"share_likelihood.*'layer', 'stage', 'model'"),
    (dict(group="O2", global_pool="max"), r"global_pool 'max'.*accepted"),
    (dict(drop_block_rate=0.1), r"drop_block_rate"),
    (dict(bandlimit=-1), r"bandlimit"),
    (dict(head="linear"), r"head must be one of \('auto', 'plain', 'learnt', 'invariant'\)"),
    (dict(group="O2", nonlinearity="elu"), r"nonlinearity must be one of \('auto', 'fourier', 'norm', 'gated'\)"),
    (dict(group="D4", nonlinearity="gated"), r"nonlinearity.*O\(2\)/SO\(2\).*channel-wise ReLU.*'auto'"),
])
def test_bad_kwargs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("pe_resnet18", **kwargs)


@pytest.mark.parametrize("name", ["pe_resnet18", "pe_wrn16_8"])
def test_classifier_without_pooling_says_so(name):
    """timm's contract lets a model without a global pool get a classifier (reset_classifier(n)
    keeps the pool); the classifier needs pooled features, so the forward says what to do."""
    model = timm.create_model(name, num_classes=4, global_pool="").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), pytest.raises(ValueError, match=r"global_pool='' leaves the features unpooled.*'avg'"):
        model(x)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).dim() == 4


def test_bad_wrn_depth():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        PEWideResNet(depth=15, widen_factor=1)


def test_the_models_never_import_the_hub():
    """The models build (and load) through eqzoo.models._builder; eqzoo.hub is for publishing."""
    for path in sorted((ROOT / "eqzoo" / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any("hub" in m.split(".") for m in modules), f"{path.name} imports {modules}"


@pytest.mark.parametrize("group, basis", [("D4", "complete"), ("C4", "complete"), ("D1", "complete"),
                                          ("D8", "antialiased"), ("O2", "antialiased")])
def test_auto_basis(group, basis):
    """basis="auto": complete where every group element maps the pixel grid to itself."""
    model = timm.create_model("pe_resnet18", group=group, layers=[1, 1, 1, 1], num_classes=2)
    assert {m.basis for m in model.modules() if isinstance(m, PEConv2d)} == {basis}
    assert model.model_args["basis"] == "auto"


# -- one declaration of the options ----------------------------------------------------------------------------
def test_one_declaration_derives_every_table():
    """An option is declared once (eqzoo.validate.OPTIONS); the checks, the layer factory's
    arguments, the load-time override check and the saved schema are read from it. Printed for
    `basis`, the tables an option addition shows up in."""
    from eqzoo.models import _builder, _schema
    from eqzoo.models._layers import FieldLayers
    from eqzoo.validate import OPTIONS, check_arg

    opt = OPTIONS["basis"]
    tables = {"check": opt.problem("fourier"), "FieldLayers.ARGS": "basis" in FieldLayers.ARGS,
              "load may not override": "basis" in _builder._FUNCTION_ARGS,
              "saved schema": _schema.model_arg_problem("pe_wrn16_8", "basis", "fourier")}
    print(tables)
    assert tables["check"] == "must be one of ('auto', 'antialiased', 'complete'), got 'fourier'"
    assert tables["FieldLayers.ARGS"] and tables["load may not override"]
    assert tables["saved schema"] == tables["check"]
    assert _schema.model_arg_problem("pe_resnet18", "basis", "complete") is None
    with pytest.raises(ValueError, match=r"basis must be one of"):
        check_arg("basis", "fourier")
    # every table is exactly what the declaration says
    assert FieldLayers.ARGS == tuple(k for k, o in OPTIONS.items() if o.layer)
    assert set(_builder._FUNCTION_ARGS) == {k for k, o in OPTIONS.items() if o.effect == "function"}
    assert set(_builder._ARCHITECTURE_ARGS) == {k for k, o in OPTIONS.items() if o.effect == "architecture"}
    # every constructor argument is declared, and the common ones are taken by every family
    for cls in (PEResNet, PEWideResNet):
        args = set(_schema.accepted_args(cls))
        assert args <= set(OPTIONS), args - set(OPTIONS)
        assert {k for k, o in OPTIONS.items() if o.common} <= args


def test_model_args_recorded_as_given():
    m = timm.create_model("pe_resnet18", block="basic", layers=[1, 1, 1, 1], num_classes=2)
    assert m.model_args["block"] == "basic" and m.model_args["layers"] == [1, 1, 1, 1]
    assert "counterpart" not in m.model_args and "device" not in m.model_args


def test_nothing_in_eqzoo_assigns_into_timm_and_private_imports_are_named_once():
    private = []
    for path in sorted((ROOT / "eqzoo").rglob("*.py")):
        tree = ast.parse(path.read_text())
        timm_names = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                      for a in n.names if a.name.split(".")[0] == "timm"}
        timm_names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                       and (n.module or "").split(".")[0] == "timm" for a in n.names}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                while isinstance(t, (ast.Attribute, ast.Subscript)):
                    t = t.value
                    if isinstance(t, ast.Name):
                        assert t.id not in timm_names, f"{path.name}:{node.lineno} assigns into timm"
            parts = (node.module or "").split(".") if isinstance(node, ast.ImportFrom) and not node.level else [""]
            if parts[0] == "timm" and any(p.startswith("_") for p in parts[1:]):
                private.append(path.relative_to(ROOT).as_posix())
    assert set(private) == {"eqzoo/_timm.py"}, private

"""What a timm user does with a model besides calling it: factory kwargs and the meta device,
TorchScript, torch.export / ONNX, and timm's data-config, checkpoint, optimizer and EMA helpers.
(timm's own model test-suite runs in test_timm_suite.py.)"""
from __future__ import annotations

import io
import json

import pytest
import timm
import timm.optim
import timm.utils
import torch
from timm.data import create_transform, resolve_data_config, resolve_model_data_config

import eqzoo
from eqzoo.nn import FieldBatchNorm2d, PEConv2d
from trained import trained_looking

# small but complete: one block per stage, every layer kind of a pe ResNet
SMALL = dict(layers=(1, 1, 1, 1), num_classes=3)


def _small(group="D4", **kwargs):
    return timm.create_model("pe_resnet18", group=group, **SMALL, **kwargs)


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# -- factory kwargs, meta device ---------------------------------------------------------------------

@pytest.mark.parametrize("group, nonlinearity", [("D4", "auto"), ("O2", "auto"), ("O2", "norm")])
def test_meta_build_then_load_or_init(group, nonlinearity):
    torch.manual_seed(0)
    real = trained_looking(_small(group, nonlinearity=nonlinearity)).eval()
    with torch.device("meta"):
        model = _small(group, nonlinearity=nonlinearity, device="meta", dtype=torch.float32)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert tensors and all(t.is_meta for _, t in tensors)
    with torch.no_grad():  # shapes propagate on meta
        assert model.eval()(torch.randn(2, 3, 32, 32, device="meta")).shape == (2, 3)

    # to_empty() + load_state_dict: the constants that no state_dict carries are rebuilt on load
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        assert _close(model(x), real(x))

    # to_empty() + init_weights(): a fresh model's initialisation (He at uniform λ, equivariant
    # kernels, λ at its initial peak, norms at 1: zero_init_last is off by default)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = _small(group, nonlinearity=nonlinearity)
    for (name, lam), want in zip(eqzoo.likelihoods(model).items(), eqzoo.likelihoods(fresh).values()):
        assert torch.allclose(lam.coefficients, want.coefficients), name
    assert float(model.layer1[0].bn2.weight.min()) == 1 and float(model.bn1.weight.min()) == 1
    for (name, got), want in zip(model.named_parameters(), fresh.parameters()):
        if name.startswith("act") or ".act" in name:  # the norm-ReLU's thresholds
            assert torch.equal(got, want), name
    with torch.no_grad():
        for name in ("conv1", "layer2.0.conv1"):
            got, want = (m.get_submodule(name).filter_and_bias()[0].std() for m in (model, fresh))
            assert 0.7 < float(got / want) < 1.4, (name, float(got), float(want))
        assert torch.isfinite(model.eval()(x)).all()
    model.init_weights(zero_init_last=True)  # timm's option: each residual branch starts silent
    assert float(model.layer1[0].bn2.weight.abs().max()) == 0 and float(model.bn1.weight.min()) == 1


def test_factory_device_dtype():
    model = timm.create_model("pe_wrn16_8", channels=(16, 16, 32, 32), device="cpu", dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert y.dtype == torch.float64
    model.reset_classifier(5)  # a new head follows the model's device and dtype
    assert model.fc.weight.dtype == torch.float64


# -- TorchScript ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", ["D4", "O2"])
def test_torchscript(group):
    torch.manual_seed(0)
    model = trained_looking(_small(group)).eval()
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        y = model(x)
    with pytest.raises(RuntimeError, match=r"PEConv2d does not compile to TorchScript.*eqzoo\.export\(model\)"):
        torch.jit.script(model)
    scripted = torch.jit.script(eqzoo.export(model))  # the exported model scripts
    assert _close(scripted(x), y)
    # tracing the eval-mode model records the filters as constants; it saves and loads
    traced = torch.jit.trace(model, (x,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    assert _close(torch.jit.load(buffer)(x), y)
    assert isinstance(model.conv1, PEConv2d)  # the model itself is untouched


# -- torch.export and ONNX ----------------------------------------------------------------------------------

@pytest.mark.parametrize("group", ["D4", "O2"])
def test_torch_export(group):
    torch.manual_seed(0)
    model = trained_looking(_small(group)).eval()
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        y = model(x)
    program = torch.export.export(model, (x,))
    assert _close(program.module()(x), y)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_export(dynamo):
    """torch.onnx.export: the new exporter (torch.export-based) and the legacy TorchScript-based one
    (eval-mode filters become constants), run with onnxruntime against the model."""
    try:
        import onnxruntime as ort
        if dynamo:
            import onnxscript  # noqa: F401  (the new exporter needs it)
    except ImportError as e:
        pytest.fail(f"{e.name} is missing: it comes with eqzoo's test extra (pip install -e '.[test]')")
    torch.manual_seed(0)
    model = trained_looking(_small("D4")).eval()
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        y = model(x)
    buffer = io.BytesIO()
    if dynamo:
        torch.onnx.export(model, (x,), dynamo=True).save(buffer)
    else:
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert _close(torch.from_numpy(out), y, tol=1e-4)


# -- timm's helpers -------------------------------------------------------------------------------------------

def test_pretrained_cfg_and_data_config():
    model = timm.create_model("pe_resnet18", **SMALL)
    assert model.default_cfg is model.pretrained_cfg and model.pretrained_cfg["architecture"] == "pe_resnet18"
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert resolve_model_data_config(model) == cfg
    wrn = timm.create_model("pe_wrn16_8", channels=(16, 16, 32, 32))
    assert resolve_model_data_config(wrn)["input_size"] == (3, 32, 32)
    assert resolve_model_data_config(wrn)["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))
    # a user's overlay reaches the model's cfg and the data config, as for timm's models
    over = timm.create_model("pe_resnet18", **SMALL, pretrained_cfg_overlay=dict(input_size=(3, 64, 64), crop_pct=1.0))
    assert over.pretrained_cfg["input_size"] == (3, 64, 64)
    cfg = resolve_data_config({}, model=over)
    assert cfg["input_size"] == (3, 64, 64)
    transform = create_transform(**cfg)
    from PIL import Image
    assert transform(Image.new("RGB", (80, 96))).shape == (3, 64, 64)


def test_checkpoint_path_optimizer_and_ema(tmp_path):
    """create_model(checkpoint_path=...) loads a train.py-style checkpoint, pretrained_cfg_overlay
    a weights file; timm's optimizer factory (layer decay, from group_matcher) and ModelEmaV3 take a
    pe model."""
    torch.manual_seed(0)
    model = trained_looking(_small()).eval()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 0, "arch": "pe_resnet18", "state_dict": model.state_dict()}, path)
    loaded = timm.create_model("pe_resnet18", **SMALL, checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        assert _close(loaded(x), model(x))

    # train.py's --pretrained-path: a weights file through pretrained_cfg_overlay (safetensors only)
    import safetensors.torch
    weights = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(model.state_dict(), weights)
    same = timm.create_model("pe_resnet18", **SMALL, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(weights), num_classes=3)).eval()
    tuned = timm.create_model("pe_resnet18", **dict(SMALL, num_classes=5), in_chans=1, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=3))
    with torch.no_grad():
        assert _close(same(x), model(x))
        assert tuned.eval()(torch.randn(1, 1, 33, 33)).shape == (1, 5)  # new head, stem summed over channels
    assert torch.equal(tuned.layer4[0].conv2.weight, model.layer4[0].conv2.weight)

    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    scales = {g["lr_scale"] for g in opt.param_groups}
    assert len(scales) > 2 and max(scales) == 1.0  # one scale per depth, the head's 1
    covered = {id(p) for g in opt.param_groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters() if p.requires_grad}

    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    model.train()
    model(x).sum().backward()
    opt.step()
    ema.update(model)
    ema.module.eval()
    with torch.no_grad():
        assert torch.isfinite(ema.module(x)).all()
    assert isinstance(ema.module.conv1, PEConv2d) and isinstance(ema.module.bn1, FieldBatchNorm2d)


def test_wrn_saves_and_loads(tmp_path):
    """The WRNs' builder argument feature_cfg, and the factory kwargs, are not model_args."""
    torch.manual_seed(0)
    model = trained_looking(timm.create_model("pe_wrn16_8", channels=(8, 8, 8, 8), num_classes=2,
                                              dtype=torch.float32)).eval()
    eqzoo.save_pretrained(model, tmp_path / "wrn", export=False, plot=False)
    args = json.loads((tmp_path / "wrn" / "config.json").read_text())["model_args"]
    assert not {"feature_cfg", "device", "dtype"} & set(args) and args["channels"] == [8, 8, 8, 8]
    loaded = timm.create_model(f"local-dir:{tmp_path / 'wrn'}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _close(loaded(x), model(x))


def test_timms_own_save_loads_back(tmp_path):
    """timm.models.save_for_hf writes what the model records (model_args with the bases' fingerprint):
    the folder loads back with its bases checked; timm's default pickle-only save is refused."""
    torch.manual_seed(0)
    model = trained_looking(_small("C4")).eval()
    timm.models.save_for_hf(model, tmp_path / "timm", safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.model_args["group"] == "C4"
    path = tmp_path / "timm" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model_args"]["basis_fingerprint"] = "0123456789abcdef"
    path.write_text(json.dumps(cfg))
    with pytest.raises(eqzoo.hub.CheckpointError, match="basis fingerprint mismatch"):
        timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    timm.models.save_for_hf(model, tmp_path / "pickled")  # timm's default: pytorch_model.bin only
    with pytest.raises(eqzoo.hub.CheckpointError, match=r"model.safetensors not found.*never from pickle"):
        timm.create_model(f"local-dir:{tmp_path / 'pickled'}", pretrained=True)


def test_saved_pretrained_cfg_describes_the_training_data(tmp_path, caplog):
    """A 1-channel model trained at 32x32 says so in what it saves (not the registry's
    [3, 224, 224] and ImageNet mean), and neither building, saving nor loading warns of channels."""
    with caplog.at_level("WARNING"):
        model = timm.create_model("pe_resnet18", in_chans=1, **SMALL)
        assert model.pretrained_cfg["input_size"][0] == 1 and len(model.pretrained_cfg["mean"]) == 1
        eqzoo.models.set_data_config(model, resolve_data_config({"input_size": (1, 32, 32), "mean": (0.13,),
                                                                 "std": (0.3,)}, model=model),
                                     label_names=["a", "b", "c"])
        eqzoo.save_pretrained(model, tmp_path / "m", export=False, plot=False)
        timm.models.save_for_hf(model, tmp_path / "t", safe_serialization=True)
        for folder in ("m", "t"):
            cfg = json.loads((tmp_path / folder / "config.json").read_text())
            assert cfg["pretrained_cfg"]["input_size"] == [1, 32, 32], folder
            assert cfg["pretrained_cfg"]["mean"] == [0.13] and cfg["pretrained_cfg"]["std"] == [0.3], folder
            loaded = timm.create_model(f"local-dir:{tmp_path / folder}", pretrained=True)
            assert resolve_model_data_config(loaded)["input_size"] == (1, 32, 32)
            assert loaded.pretrained_cfg["label_names"] == ["a", "b", "c"]
    assert not [r for r in caplog.records if "does not match" in r.getMessage()]
    with pytest.raises(ValueError, match="2 label names for 3 classes"):
        eqzoo.models.set_data_config(model, label_names=["a", "b"])


def test_exported_counterpart_describes_the_training_data(tmp_path, caplog):
    """The plain timm model of a saved folder (exported/) takes the pe model's input, not the
    registry's [3, 224, 224] and ImageNet mean, and writing it warns of nothing."""
    with caplog.at_level("WARNING"):
        model = timm.create_model("pe_resnet18", in_chans=1, num_classes=3)
        eqzoo.models.set_data_config(model, input_size=(1, 32, 32), mean=(0.13,), std=(0.3,), label_names=["a", "b", "c"])
        eqzoo.save_pretrained(model, tmp_path / "m", plot=False)
        cfg = json.loads((tmp_path / "m" / "exported" / "config.json").read_text())
        assert cfg["architecture"] == "resnet18" and cfg["pretrained_cfg"]["input_size"] == [1, 32, 32]
        assert cfg["pretrained_cfg"]["mean"] == [0.13] and cfg["pretrained_cfg"]["label_names"] == ["a", "b", "c"]
        plain = timm.create_model(f"local-dir:{tmp_path / 'm' / 'exported'}", pretrained=True)
        assert resolve_model_data_config(plain)["input_size"] == (1, 32, 32)
    assert not [r for r in caplog.records if "does not match" in r.getMessage()]

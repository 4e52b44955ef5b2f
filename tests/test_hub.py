"""Publishing to and loading from the Hub, with the real huggingface_hub client over HTTP
against tests/hub_server.py's LocalHub. One pe_resnet18 (C4, 10 classes, random λ) is built, saved
and pushed once per module; every load goes through timm.create_model."""

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard

import eqzoo
from trained import trained_looking
import eqzoo.hub as hub
from eqzoo.hub import CheckpointError, HubConfigError, PushError
from hub_server import offline, serve_hub

REPO = "eqzoo-test/pe-resnet18-c4"
TOKEN = "hf_test_secret_token"
CARD = dict(license="mit", datasets=["mnist"], dataset_name="rotated MNIST", split="test",
            results={"accuracy": 0.987}, training="Rotated MNIST, 10 epochs.")


def _lambdas(model):
    return {k: lam.coefficients.detach().clone() for k, lam in eqzoo.likelihoods(model).items()}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = timm.create_model("pe_resnet18", group="C4", num_classes=10)
    return trained_looking(m, 0.5).eval()  # a learnt-looking, non-uniform λ in every layer


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def y(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return hub.save_pretrained(model, tmp_path_factory.mktemp("saved"), card_data=CARD, repo_id=REPO)


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    with serve_hub(tmp_path_factory.mktemp("hub"), token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def pushed(model, local_hub):
    return hub.push_to_hub(model, REPO, card_data=CARD)


def _load(spec, **kwargs):
    with torch.no_grad():
        return timm.create_model(spec, pretrained=True, **kwargs).eval()


def _copy(saved, tmp_path):
    """A copy of the saved folder (hard links: modify files only through _write)."""
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst, copy_function=os.link)
    return dst


def _write(path, data):
    path.unlink(missing_ok=True)  # break the hard link before writing
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    _write(folder / "config.json", json.dumps(cfg))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any torch.load / pickle load fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")
    for obj, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(obj, name, refuse)


@pytest.fixture
def nothing_built(monkeypatch):
    from eqzoo.models import pe_resnet

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the config was validated")
    monkeypatch.setattr(pe_resnet.PEResNet, "__init__", refuse)


# -- save --------------------------------------------------------------------------------------------
def test_saved_layout(saved, model):
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert files == {"config.json", "model.safetensors", "likelihoods.json", "likelihoods.png", "README.md",
                     "exported/config.json", "exported/model.safetensors"}
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["architecture"] == "pe_resnet18" and cfg["num_classes"] == 10
    assert cfg["model_args"]["group"] == "C4" and cfg["model_args"]["num_classes"] == 10
    assert {"num_features", "global_pool", "pretrained_cfg"} <= set(cfg)
    assert "eqzoo" not in cfg["pretrained_cfg"]
    meta = cfg["eqzoo"]
    assert meta["basis_fingerprint"] == hub.basis_fingerprint(model)
    assert set(meta["versions"]) >= {"eqzoo", "escnn", "timm"} and meta["exported"]["architecture"] == "resnet18"
    assert (saved / "likelihoods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(saved.glob("*.tmp")) and not list(saved.glob(".*"))


def test_likelihoods_json_matches_model(saved, model):
    data = json.loads((saved / "likelihoods.json").read_text())["likelihoods"]
    lams = eqzoo.likelihoods(model)
    assert list(data) == list(lams)
    for key, lam in lams.items():
        e = data[key]
        assert e["group"] == "C4" and e["layers"] == [key.rsplit(".likelihood", 1)[0]]
        assert e["coefficients"] == pytest.approx(lam.coefficients.tolist())
        assert e["grid"]["density"] == pytest.approx(lam.grid_density().tolist(), rel=1e-6)
        assert e["summary"]["closest_subgroup"] == lam.summary()["closest_subgroup"]
    loaded = eqzoo.hub.load_likelihoods(saved)
    assert all(torch.equal(loaded[k].coefficients, lams[k].coefficients) for k in lams)


def test_model_card(saved, model):
    card = ModelCard.load(saved / "README.md")
    d = card.data.to_dict()
    assert d["library_name"] == "timm" and d["license"] == "mit" and d["datasets"] == ["mnist"]
    assert {"eqzoo", "c4", "image-classification"} <= set(d["tags"])
    result = d["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.987}
    text = card.text
    assert text.index("import eqzoo") < text.index(f'timm.create_model("hf-hub:{REPO}"')
    assert "](likelihoods.png)" in text and "Rotated MNIST, 10 epochs." in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "C4" in line]
    assert len(table) == len(eqzoo.likelihoods(model))  # one row per likelihood
    assert "escnn 1.0" in text and "resnet18" in text


def test_save_refuses_non_pe_models(tmp_path):
    with pytest.raises(HubConfigError, match="pe_"):
        hub.save_pretrained(timm.create_model("resnet10t", num_classes=2), tmp_path)
    assert not list(tmp_path.iterdir())


# -- load --------------------------------------------------------------------------------------------
def test_local_dir_round_trip(saved, model, x, y, no_unpickling):
    m = _load(f"local-dir:{saved}")
    assert torch.equal(m(x), y)
    assert all(torch.equal(a, b) for a, b in zip(_lambdas(m).values(), _lambdas(model).values()))


def _hub_code_run_by(fn) -> set:
    """Names of the eqzoo.hub functions that run while ``fn()`` runs."""
    ran = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith("eqzoo.hub"):
            ran.add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return ran


def test_building_and_loading_run_no_hub_code(saved):
    assert not _hub_code_run_by(lambda: timm.create_model("pe_resnet18", group="C4", num_classes=10))
    assert not _hub_code_run_by(lambda: _load(f"local-dir:{saved}"))


def test_config_json_is_read_once(saved, monkeypatch):
    reads, read_text = [], Path.read_text

    def counting(path, *args, **kwargs):
        reads.extend([path] if path.name == "config.json" else [])
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    _load(f"local-dir:{saved}")
    assert len(reads) == 1, reads


def test_exported_loads_in_plain_timm_without_eqzoo(saved, x, y, tmp_path):
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, timm, torch\n"
            f"m = timm.create_model('local-dir:{saved / 'exported'}', pretrained=True).eval()\n"
            f"torch.save(m(torch.load('{tmp_path / 'x.pt'}')).detach(), '{tmp_path / 'y.pt'}')\n"
            "assert not any(k.startswith(('eqzoo', 'escnn')) for k in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "y.pt"), y, atol=1e-4, rtol=1e-4)


def test_hub_push_then_load(pushed, local_hub, model, x, y, no_unpickling):
    assert set(local_hub.files(REPO)) >= {"config.json", "model.safetensors", "likelihoods.json", "likelihoods.png",
                                          "README.md", "exported/model.safetensors", ".gitattributes"}
    m = _load(f"hf-hub:{REPO}")
    assert torch.equal(m(x), y)
    assert all(torch.equal(a, b) for a, b in zip(_lambdas(m).values(), _lambdas(model).values()))
    assert local_hub.last_authorization == f"Bearer {TOKEN}"


def test_load_likelihoods_from_hub_and_offline(pushed, model):
    lams = eqzoo.hub.load_likelihoods(f"hf-hub:{REPO}")
    assert list(lams) == list(eqzoo.likelihoods(model))
    assert all(torch.equal(lams[k].coefficients, v.coefficients) for k, v in eqzoo.likelihoods(model).items())
    assert lams["conv1.likelihood"].layers == ["conv1"]
    with offline():
        again = eqzoo.hub.load_likelihoods(f"hf-hub:{REPO}")
    assert list(again) == list(lams)


def test_pinned_revision_second_push_and_offline(pushed, local_hub, model, x, y):
    first = pushed.oid
    saved_coeffs = _lambdas(model)
    try:  # a second, different model to the same repo
        with torch.no_grad():
            eqzoo.likelihoods(model)["conv1.likelihood"].coefficients.mul_(-3)
            y2 = model(x)
        second = hub.push_to_hub(model, REPO, commit_message="second").oid
        hub.push_to_hub(model, REPO, revision="v2")  # a branch
    finally:
        with torch.no_grad():
            for k, lam in eqzoo.likelihoods(model).items():
                lam.coefficients.copy_(saved_coeffs[k])
    assert first != second and not torch.allclose(y, y2)
    assert local_hub.files(REPO, "v2")["model.safetensors"] == local_hub.files(REPO, second)["model.safetensors"]
    assert torch.equal(_load(f"hf-hub:{REPO}")(x), y2)  # main moved
    assert torch.equal(_load(f"hf-hub:{REPO}@{first}")(x), y)  # pinned
    with offline():  # everything comes from the cache
        assert torch.equal(_load(f"hf-hub:{REPO}@{first}")(x), y)


def test_registry_tag_reads_model_args_from_hub(pushed, x, y):
    # no group/num_classes given: the default (D4, 1000 classes) would not even load these weights
    m = _load("pe_resnet18", pretrained_cfg_overlay=dict(hf_hub_id=f"{REPO}@{pushed.oid}"))
    assert m.num_classes == 10 and m.group.spec == "C4"
    assert torch.equal(m(x), y)
    assert hub.model_args_from_hub(dict(hf_hub_id=REPO))["group"] == "C4"


def test_finetune_new_head_and_in_chans(saved, model, caplog):
    with caplog.at_level(logging.WARNING):
        m = _load(f"local-dir:{saved}", num_classes=5, in_chans=1)
    assert "re-initialising the classifier fc" in caplog.text
    assert m.num_classes == 5 and m(torch.randn(1, 1, 33, 33)).shape == (1, 5)
    sd, ref = m.state_dict(), model.state_dict()
    with torch.no_grad():  # the stem's filter is summed over input channels, as timm adapts stems
        assert torch.allclose(m.conv1.filter_and_bias()[0], model.conv1.filter_and_bias()[0].sum(1, keepdim=True),
                              atol=1e-5)
    assert torch.equal(sd["layer4.1.conv2.weight"], ref["layer4.1.conv2.weight"])
    assert sd["fc.weight"].shape != ref["fc.weight"].shape


# -- bad inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, error", [
    (lambda c: c["model_args"].update(not_an_arg=1), r"\['not_an_arg'\] is an unknown key"),
    (lambda c: c["model_args"].update(group=4), r"model_args\['group'\] must be a group spec string"),
    (lambda c: c["model_args"].update(group="D5x"), "unknown group"),
    (lambda c: c["model_args"].update(learn_likelihood="yes"), r"must be true or false \(a bool\), got 'yes'"),
    (lambda c: c["model_args"].update(num_classes=7), "disagrees"),
    (lambda c: c["pretrained_cfg"].update(eqzoo={}), "custom metadata"),
    (lambda c: c.pop("eqzoo"), "no 'eqzoo' section"),
    (lambda c: c["eqzoo"].update(hub_format=99), "Upgrade eqzoo"),
])
def test_invalid_config_refused_before_build(saved, tmp_path, nothing_built, edit, error):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(HubConfigError, match=error):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_unknown_architecture(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c.update(architecture="pe_nonexistent"))
    with pytest.raises(RuntimeError, match="Unknown model"):  # timm's own check, before any build
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(HubConfigError, match="not a registered eqzoo model"):
        hub.read_config(folder)


def test_basis_fingerprint_mismatch(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c["eqzoo"].update(basis_fingerprint="0123456789abcdef"))
    with pytest.raises(CheckpointError, match="basis fingerprint mismatch.*escnn 1.0"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


@pytest.mark.parametrize("damage, error", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:8] + b"\x00not json" + b[17:], "not a valid safetensors"),
    (lambda b: b + b"junk", "trailing bytes"),
    (lambda b: os.urandom(64), "not a valid safetensors"),
])
def test_damaged_weights(saved, tmp_path, nothing_built, damage, error):
    folder = _copy(saved, tmp_path)
    _write(folder / "model.safetensors", damage((saved / "model.safetensors").read_bytes()))
    with pytest.raises(CheckpointError, match=f"model.safetensors.*{error}.*save it again"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_pickle_weights_never_loaded_local(saved, tmp_path, nothing_built, no_unpickling):
    folder = _copy(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="model.safetensors not found.*never from pickle"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_pickle_weights_never_loaded_hub(saved, local_hub, nothing_built, no_unpickling):
    api = HfApi(token=TOKEN)
    repo = api.create_repo("eqzoo-test/pickled", exist_ok=True).repo_id
    api.upload_file(path_or_fileobj=saved / "config.json", path_in_repo="config.json", repo_id=repo)
    api.upload_file(path_or_fileobj=b"\x80\x04not really a pickle", path_in_repo="pytorch_model.bin", repo_id=repo)
    with pytest.raises(CheckpointError, match="model.safetensors not found in Hub repo eqzoo-test/pickled"):
        timm.create_model(f"hf-hub:{repo}", pretrained=True)


def test_failed_push_keeps_local_files_and_hides_token(model, local_hub, tmp_path, caplog):
    local_hub.fail_commits = True
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(PushError) as info:
            hub.push_to_hub(model, "eqzoo-test/failing", save_directory=tmp_path / "run", token=TOKEN)
    finally:
        local_hub.fail_commits = False
    message = str(info.value)
    assert "eqzoo publish" in message and TOKEN not in message and TOKEN not in caplog.text
    assert info.value.__cause__ is None  # nothing chained that could carry secrets
    hub.read_config(tmp_path / "run")  # intact and valid
    hub.check_safetensors(tmp_path / "run" / "model.safetensors")
    assert "model.safetensors" not in local_hub.files("eqzoo-test/failing")


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_inspect_and_publish(saved, local_hub, model, tmp_path, capsys):
    from eqzoo.cli import main

    assert main(["inspect", f"local-dir:{saved}", "--out", str(tmp_path / "l.png")]) == 0
    out = capsys.readouterr().out
    assert "| layer | group | kl_uniform" in out and "layer4.1.conv2" in out
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["publish", str(saved), "eqzoo-test/published", "--revision", "v1"]) == 0
    files = local_hub.files("eqzoo-test/published", "v1")
    assert files["model.safetensors"] == (saved / "model.safetensors").read_bytes()
    assert files["README.md"] == (saved / "README.md").read_bytes()
    capsys.readouterr()
    assert main(["publish", str(tmp_path / "nowhere"), "eqzoo-test/published"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_cli_push_of_a_saved_folder(saved, local_hub, model, capsys):
    from eqzoo.cli import main

    assert main(["push", str(saved), "eqzoo-test/cli-pushed"]) == 0
    assert "eqzoo-test/cli-pushed" in capsys.readouterr().out
    files = local_hub.files("eqzoo-test/cli-pushed")
    assert {"config.json", "model.safetensors", "likelihoods.json", "likelihoods.png", "README.md"} <= set(files)
    pulled = _load("hf-hub:eqzoo-test/cli-pushed")
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(pulled(x), model.eval()(x))

"""Publishing to and loading from the Hub, with the real huggingface_hub client over HTTP
against scripts/hub_server.py's LocalHub. One pe_resnet18 (C4, 10 classes, random λ) is built, saved
and pushed once per module; every load goes through timm.create_model."""

import json
import logging
import os
import pickle
import re
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
CARD = dict(license="mit", datasets=["mnist"], dataset_name="rotated MNIST",
            results={"test": {"accuracy": 0.987}, "validation": {"accuracy": 0.99}}, training="Rotated MNIST, 10 epochs.")
LABELS = [f"digit {i}" for i in range(10)]


def _lambdas(model):
    return {k: lam.coefficients.detach().clone() for k, lam in eqzoo.likelihoods(model).items()}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = timm.create_model("pe_resnet18", group="C4", num_classes=10)
    return trained_looking(m, 0.5).eval()  # a learnt-looking, non-uniform λ in every layer


@pytest.fixture(scope="module")
def tiny():
    """A small model for pushes whose weights do not matter."""
    torch.manual_seed(0)
    m = timm.create_model("pe_resnet18", group="C4", num_classes=3, layers=[1, 1, 1, 1], stem_width=8,
                          channels=[8, 8, 16, 16])
    return trained_looking(m, 0.5).eval()


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
    # timm's push_to_hf_hub order: commit_message third, model_config (label names) after create_pr
    return hub.push_to_hub(model, REPO, "Add model", TOKEN, None, False, False, dict(label_names=LABELS),
                           card_data=CARD)


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
    # not timm: the Hub's timm snippet calls timm.create_model without `import eqzoo`, which fails
    assert d["library_name"] == "eqzoo" and d["pipeline_tag"] == "image-classification"
    assert d["license"] == "mit" and d["datasets"] == ["mnist"] and d["metrics"] == ["accuracy"]
    assert {"eqzoo", "c4", "image-classification"} <= set(d["tags"]) and not {"timm", "transformers"} & set(d["tags"])
    results = {r["dataset"]["split"]: r for r in d["model-index"][0]["results"]}
    assert results["test"]["metrics"] == [{"type": "accuracy", "value": 0.987, "name": "Top-1 accuracy"}]
    assert results["validation"]["metrics"][0]["value"] == 0.99
    assert results["test"]["dataset"] == {"name": "rotated MNIST", "type": "mnist", "split": "test"}
    assert "base_model" not in d  # trained from scratch
    text = card.text
    assert text.index("import eqzoo") < text.index(f'timm.create_model("hf-hub:{REPO}"')
    assert "](likelihoods.png)" in text and "Rotated MNIST, 10 epochs." in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "C4" in line]
    assert len(table) == len(eqzoo.likelihoods(model))  # one row per likelihood
    assert "escnn 1.0" in text and "resnet18" in text
    stats = hub.card.model_stats(model, (3, 224, 224))
    assert f"Params (M): {stats['params']:.3g}" in text and f"GMACs: {stats['gmacs']:.3g}" in text
    assert f"Activations (M): {stats['activations']:.3g}" in text and "Image size: train = 224 x 224" in text
    for section in ("### Feature map extraction", "### Image embeddings", "## Citation",
                    "Learning the Degree of Equivariance in Steerable {CNNs}", "arxiv.org/abs/2406.03946"):
        assert section in text
    assert "| validation | Top-1 accuracy | 0.99 |" in text


def test_model_stats_are_timms():
    # timm's own card for resnet18 says 1.8 GMACs and 2.5 M activations at 224 x 224
    stats = hub.card.model_stats(timm.create_model("resnet18"), (3, 224, 224))
    assert round(stats["gmacs"], 1) == 1.8 and round(stats["activations"], 1) == 2.5 and round(stats["params"], 1) == 11.7


def test_fine_tune_card_names_its_base_model():
    cfg = {"model": f"hf-hub:{REPO}@abc123", "data": {"name": "digits", "batch_size": 8, "symmetry": ["C1"]},
           "optim": {"name": "adamw", "lr": 1e-3}, "schedule": {"epochs": 1}, "regularizer": {}}
    card = hub.card.run_card_data(cfg, {"val_acc": 0.5, "test_acc": 0.25, "test_loss": 1.0})
    assert card["base_model"] == REPO
    assert card["results"] == {"validation": {"accuracy": 0.5}, "test": {"accuracy": 0.25}}


@pytest.mark.parametrize("card_data, match", [
    (dict(results={"accuracy": 0.9}), r"card_data\['results'\] must be \{split: \{metric: number\}\}"),
    (dict(results={"val": {"accuracy": 0.9}}), r"splits \['train', 'validation', 'test'\]"),
    (dict(split="test"), r"unknown keys \['split'\]"),
])
def test_bad_card_data(tiny, tmp_path, card_data, match):
    with pytest.raises(ValueError, match=match):
        hub.save_pretrained(tiny, tmp_path / "m", card_data=card_data, plot=False, export=False)
    assert not list(tmp_path.iterdir())


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


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


def test_card_code_runs_as_copied(pushed, local_hub, capsys):
    assert HfApi().model_info(REPO).sha == pushed.oid  # the card's code loads main: runs before later pushes
    card = local_hub.files(REPO, pushed.oid)["README.md"].decode()
    blocks = _python_blocks(card)
    assert len(blocks) == 5 and all(block.startswith(("import eqzoo", "import timm")) for block in blocks)
    for block in blocks:  # each in a fresh namespace, as a user pastes one
        exec(compile(block, "<model card>", "exec"), {"__name__": "__card__"})
    out = capsys.readouterr().out
    assert "digit " in out  # the classification block prints class names from config.json
    assert "torch.Size([1, 512, 7, 7])" in out  # feature maps, the last stage
    assert "conv1.likelihood" in out


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


def test_hf_hub_id_overlay_builds_the_architecture_of_the_code(pushed, x, y):
    # as with a timm tag, the architecture comes from the arguments given, the weights from the Hub
    overlay = dict(hf_hub_id=f"{REPO}@{pushed.oid}", num_classes=10)  # else timm drops the classifier
    m = _load("pe_resnet18", group="C4", num_classes=10, pretrained_cfg_overlay=overlay)
    assert torch.equal(m(x), y)
    with pytest.raises(CheckpointError, match="basis fingerprint mismatch"):  # the default D4 build: refused
        _load("pe_resnet18", num_classes=10, pretrained_cfg_overlay=overlay)
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
def test_cli_inspect_and_publish(saved, tiny, local_hub, tmp_path, capsys):
    from eqzoo.cli import main

    assert main(["inspect", f"local-dir:{saved}", "--out", str(tmp_path / "l.png")]) == 0
    out = capsys.readouterr().out
    assert "| layer | group | kl_uniform" in out and "layer4.1.conv2" in out
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    # `hf upload REPO_ID LOCAL_PATH`'s order and flags
    assert main(["publish", "eqzoo-test/published", str(saved), "--revision", "v1", "--commit-message", "v1"]) == 0
    files = local_hub.files("eqzoo-test/published", "v1")
    assert files["model.safetensors"] == (saved / "model.safetensors").read_bytes()
    assert files["README.md"] == (saved / "README.md").read_bytes()
    assert HfApi().list_repo_commits("eqzoo-test/published", revision="v1")[0].title == "v1"
    capsys.readouterr()
    tiny_saved = hub.save_pretrained(tiny, tmp_path / "tiny", plot=False, export=False)
    assert main(["publish", "eqzoo-test/published", str(tiny_saved), "--create-pr", "--overwrite-card"]) == 0
    assert "pull request" in capsys.readouterr().out
    assert local_hub.files("eqzoo-test/published", "refs/pr/1")["config.json"] == \
        (tiny_saved / "config.json").read_bytes()
    assert main(["publish", "eqzoo-test/published", str(tmp_path / "nowhere")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_push_follows_timm(pushed, local_hub, tiny, tmp_path):
    cfg = json.loads(local_hub.files(REPO, pushed.oid)["config.json"])
    assert cfg["label_names"] == LABELS
    assert _load(f"hf-hub:{REPO}@{pushed.oid}").pretrained_cfg["label_names"] == LABELS
    repo = "eqzoo-test/card-kept"
    HfApi().create_repo(repo)
    HfApi().upload_file(path_or_fileobj=b"---\nlicense: mit\n---\nedited on the Hub\n", path_in_repo="README.md",
                        repo_id=repo)
    hub.push_to_hub(tiny, repo, "first", save_directory=tmp_path / "m")
    assert local_hub.files(repo)["README.md"].endswith(b"edited on the Hub\n")  # kept, as timm keeps it
    assert "model.safetensors" in local_hub.files(repo)
    pr = hub.push_to_hub(tiny, repo, "with card", create_pr=True, overwrite_card=True)
    assert pr.pr_revision == "refs/pr/1"
    assert local_hub.files(repo, "refs/pr/1")["README.md"] == (tmp_path / "m" / "README.md").read_bytes()
    assert local_hub.files(repo)["README.md"].endswith(b"edited on the Hub\n")  # main untouched
    with pytest.raises(PushError, match="create_pr opens a pull request against main"):
        hub.push_to_hub(tiny, repo, create_pr=True, revision="v2")
    with pytest.raises(ValueError, match="safetensors only"):
        hub.push_to_hub(tiny, repo, safe_serialization="both")


def test_label_names_survive_a_load_and_save(tiny, tmp_path):
    first = hub.save_pretrained(tiny, tmp_path / "first", dict(label_names=["a", "b", "c"]), plot=False, export=False)
    again = hub.save_pretrained(_load(f"local-dir:{first}"), tmp_path / "again", plot=False, export=False)
    assert _load(f"local-dir:{again}").pretrained_cfg["label_names"] == ["a", "b", "c"]
    assert 'print([model.pretrained_cfg["label_names"]' in (again / "README.md").read_text()


@pytest.mark.parametrize("model_config, match", [
    (dict(label_names=["a", "b"]), r"label_names'\] must be 3 class names"),
    (dict(labels=["a"] * 10), r"model_config has keys \['labels'\]"),
])
def test_bad_model_config(tiny, tmp_path, model_config, match):
    with pytest.raises(HubConfigError, match=match):
        hub.save_pretrained(tiny, tmp_path / "m", model_config)
    assert not list(tmp_path.iterdir())


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


def test_timms_own_push_loads_back(tiny, local_hub, no_unpickling):
    """timm.models.push_to_hf_hub on a pe model uploads what the model records (model_args with the
    bases' fingerprint): the repo loads back through hf-hub: from its safetensors."""
    repo = "eqzoo-test/timm-push"
    timm.models.push_to_hf_hub(tiny, repo, token=TOKEN, model_config=dict(label_names=["a", "b", "c"]))
    loaded = _load(f"hf-hub:{repo}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny(x))
    assert loaded.model_args["group"] == "C4" and loaded.pretrained_cfg["label_names"] == ["a", "b", "c"]

"""scripts/release.py end to end on a tiny release: build (train, stage, eqzoo eval), publish to the
local Hub server with pinned registry tags, then load the tags in fresh processes: online, from the
cache with HF_HUB_OFFLINE=1, and refused once the repo has been changed at the pinned revision."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import eqzoo
import eqzoo.train
from eqzoo.errors import ConfigError, HubConfigError
from eqzoo.models import _pretrained
from hub_server import serve_hub

ROOT = Path(__file__).resolve().parents[1]
ORG = "eqzoo-test"
TINY = dict(layers=[1, 1, 1, 1], stem_width=8, channels=[8, 8, 16, 16])
DATA = dict(name="digits", symmetry="SO2", image_size=16, train_size=200, val_size=50, test_size=100, batch_size=50)
# run in a fresh interpreter: the registry is read when eqzoo is imported
LOAD = """
import json, sys
import torch, timm, eqzoo
tag = sys.argv[1]
model = timm.create_model(tag, pretrained=True).eval()
bare = timm.create_model(tag)
x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    y = model(x)
print(json.dumps({"y": y.tolist(), "pretrained": timm.list_pretrained("pe_*"),
                  "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
                  "bare_shapes": {k: list(v.shape) for k, v in bare.state_dict().items()},
                  "default_classes": timm.create_model("pe_resnet18", layers=[1, 1, 1, 1]).num_classes}))
"""


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_release(folder: Path, name: str, model: str, model_args: dict, tag: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"release": {"tag": tag, "publish": tag is not None, "repo": tag, "dataset": "digits, rotated",
                       "recipe": "placeholder", "description": "A tiny test release."},
           "train": {"model": model, "model_args": dict(TINY, **model_args), "data": DATA,
                     "schedule": {"epochs": 1}, "threads": 1, "progress": False}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")


def run_load(tag: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD, tag], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("release")
    configs, out = tmp / "configs", tmp / "out"
    write_release(configs, "d4_rotmnist", "pe_resnet18", {}, "pe_resnet18.d4_rotmnist")
    write_release(configs, "resnet18_rotmnist", "resnet18", {}, None)
    release = load_script("release")
    release.main(["build", "--configs", str(configs), "--out", str(out)])
    return release, tmp, configs, out


def test_build_stages_an_evaluated_checkpoint(built):
    release, _, configs, out = built
    record = json.loads((out / "d4_rotmnist" / "release.json").read_text())
    stage = out / "d4_rotmnist" / "stage"
    assert {"model.safetensors", "config.json", "likelihoods.json", "likelihoods.png", "README.md"} <= \
        {p.name for p in stage.iterdir()}
    assert record["eval_test_accuracy"] == pytest.approx(record["test_accuracy"])
    assert len(record["val_curve"]) == 1 and record["wall_seconds"] == pytest.approx(sum(record["epoch_seconds"]))
    assert [row["layer"] for row in record["lambda"]] and all("closest_subgroup" in r for r in record["lambda"])
    card = (stage / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    filed = [(r["dataset"].get("split"), m["value"]) for r in front["model-index"][0]["results"] for m in r["metrics"]]
    assert ("test", pytest.approx(record["test_accuracy"])) in filed
    assert "python scripts/release.py build d4_rotmnist" in card and record["commit"].split("+")[0][:12] in card
    assert "closest_subgroup" in card  # the λ read-out per layer
    assert (out / "resnet18_rotmnist" / "stage" / "model.safetensors").is_file()
    # a finished build is skipped: the record is not rewritten
    before = (out / "d4_rotmnist" / "release.json").stat().st_mtime_ns
    release.main(["build", "d4_rotmnist", "--configs", str(configs), "--out", str(out)])
    assert (out / "d4_rotmnist" / "release.json").stat().st_mtime_ns == before
    release.main(["speed", "d4_rotmnist", "--batches", "10", "20", "--steps", "2", "--configs", str(configs),
                  "--out", str(out)])
    rows = [line.split("|") for line in (out / "speed.md").read_text().splitlines() if "| d4_rotmnist |" in line]
    assert [int(row[2]) for row in rows] == [10, 20] and all(float(row[4]) >= 0 for row in rows)
    release.main(["report", "--out", str(out)])
    assert "| d4_rotmnist | pe_resnet18.d4_rotmnist | yes |" in (out / "release.md").read_text()


def test_publish_pins_tags_that_load_online_offline_and_refuse_a_changed_repo(built):
    release, tmp, _, out = built
    registry = tmp / "published.json"
    package_registry = _pretrained.REGISTRY_FILE.read_bytes()
    with serve_hub(tmp / "server") as hub:
        release.main(["publish", "--org", ORG, "--out", str(out), "--registry", str(registry)])
        assert _pretrained.REGISTRY_FILE.read_bytes() == package_registry  # the package's stays as it was
        entry = _pretrained.read_registry(registry)["pe_resnet18.d4_rotmnist"]
        repo = f"{ORG}/pe_resnet18.d4_rotmnist"
        assert set(_pretrained.read_registry(registry)) == {"pe_resnet18.d4_rotmnist"}  # baselines get no tag
        assert entry["hf_hub_id"] == repo and len(entry["revision"]) == 40
        assert hub.files(repo, entry["revision"])["model.safetensors"] == \
            (out / "d4_rotmnist" / "stage" / "model.safetensors").read_bytes()
        assert f"hf-hub:{repo}" in hub.files(repo, entry["revision"])["README.md"].decode()

        local = timm.create_model(f"local-dir:{out / 'd4_rotmnist' / 'stage'}", pretrained=True).eval()
        with torch.no_grad():
            want = local(torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(EQZOO_PUBLISHED=str(registry), HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp / "cache"),
                   HF_HOME=str(tmp / "hf-home"), HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
        online = run_load("pe_resnet18.d4_rotmnist", env)
        assert online.returncode == 0, online.stderr
        got = json.loads(online.stdout)
        assert torch.allclose(torch.tensor(got["y"]), want, atol=1e-6)
        assert got["pretrained"] == ["pe_resnet18.d4_rotmnist"] and got["default_classes"] == 1000
        assert got["shapes"] == got["bare_shapes"]  # the tag's architecture, with or without weights

        offline = run_load("pe_resnet18.d4_rotmnist", dict(env, HF_HUB_OFFLINE="1"))
        assert offline.returncode == 0, offline.stderr
        assert torch.allclose(torch.tensor(json.loads(offline.stdout)["y"]), want, atol=1e-6)

        # the repo rewritten at the pinned commit (another model's consistent config and weights)
        other = tmp / "other"
        eqzoo.save_pretrained(timm.create_model("pe_resnet18", num_classes=10, in_chans=1, **TINY), other)
        with hub._lock:
            commit = hub.repos["model", repo].resolve(entry["revision"])
            for name in ("config.json", "model.safetensors"):
                commit.files[name] = hub._put_blob((other / name).read_bytes())
        changed = run_load("pe_resnet18.d4_rotmnist", dict(env, HF_HUB_CACHE=str(tmp / "fresh-cache")))
        assert changed.returncode != 0
        assert "changed after publication" in changed.stderr and "pe_resnet18.d4_rotmnist" in changed.stderr


def test_a_killed_build_resumes_and_a_changed_config_is_refused(tmp_path, one_thread):
    release = load_script("release")
    configs, out = tmp_path / "configs", tmp_path / "out"
    write_release(configs, "strict", "pe_resnet18", {"learn_likelihood": False}, None)
    doc = yaml.safe_load((configs / "strict.yaml").read_text())
    doc["train"]["schedule"]["epochs"] = 2
    (configs / "strict.yaml").write_text(yaml.safe_dump(doc))
    rel = release.read_release(configs / "strict.yaml", out)
    eqzoo.train.train(rel["train"], stop_after_epoch=1)  # as if the build had been killed after epoch 1
    first = json.loads((out / "strict" / "run" / "metrics.json").read_text())
    release.main(["build", "--configs", str(configs), "--out", str(out)])
    history = json.loads((out / "strict" / "run" / "metrics.json").read_text())
    assert len(history) == 2 and history[0] == first[0]  # epoch 1 kept, epoch 2 added
    assert json.loads((out / "strict" / "release.json").read_text())["val_curve"] == [h["val_acc"] for h in history]
    weights = (out / "strict" / "stage" / "model.safetensors").read_bytes()
    doc["release"]["recipe"] = "measured"  # the release section only: a new card, the same weights, no training
    (configs / "strict.yaml").write_text(yaml.safe_dump(doc))
    release.main(["build", "--configs", str(configs), "--out", str(out)])
    record = json.loads((out / "strict" / "release.json").read_text())
    assert record["recipe"] == "measured" and "Recipe (measured)" in (out / "strict" / "stage" / "README.md").read_text()
    assert json.loads((out / "strict" / "run" / "metrics.json").read_text()) == history
    assert (out / "strict" / "stage" / "model.safetensors").read_bytes() == weights
    doc["train"]["optim"] = {"lr": 0.5}
    (configs / "strict.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit, match=r"strict.yaml has changed since strict was built"):
        release.main(["build", "--configs", str(configs), "--out", str(out)])


def test_bad_release_files_and_registries_are_named(tmp_path):
    release = load_script("release")
    write_release(tmp_path, "bad", "pe_resnet18", {}, "pe_resnet18.bad")
    doc = yaml.safe_load((tmp_path / "bad.yaml").read_text())
    doc["release"]["recipe"] = "guess"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"release.recipe must be one of placeholder, measured"):
        release.read_release(tmp_path / "bad.yaml", tmp_path / "out")
    doc["release"].update(recipe="measured", tag="resnet18.bad")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"must start with the model"):
        release.read_release(tmp_path / "bad.yaml", tmp_path / "out")
    entry = {"hf_hub_id": "org/name", "revision": "main", "sha256": "0" * 64, "model_args": {}, "num_classes": 10,
             "input_size": [1, 16, 16]}
    with pytest.raises(HubConfigError, match=r"'revision' must be a full commit sha"):
        _pretrained.write_registry({"pe_resnet18.x": entry}, tmp_path / "reg.json")
    (tmp_path / "reg.json").write_text('{"format": 1, "tags": {"pe_resnet18.x": {"hf_hub_id": "org/name"}}}')
    with pytest.raises(HubConfigError, match=r"reg.json: tag 'pe_resnet18.x': key 'revision' is missing"):
        _pretrained.read_registry(tmp_path / "reg.json")

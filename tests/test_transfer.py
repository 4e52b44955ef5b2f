"""scripts/transfer.py on a tiny release: the published checkpoints fine-tuned from the local Hub
server (the unpublished CNN from its staged folder) and trained from scratch on the same few labels,
resumably; the report's table; and the few-label data sets it uses."""
import json

import numpy as np
import pytest
import torch
import yaml

import eqzoo
from eqzoo.config import load_config
from eqzoo.data import build_datasets
from eqzoo.data.fewshot import per_class_indices
from eqzoo.errors import ConfigError
from hub_server import serve_hub
from test_release import load_script, write_release

ORG = "eqzoo-test"


def test_fewshot_draws_balanced_disjoint_labels_fixed_by_the_seed():
    y = torch.arange(10).repeat(20)
    train = per_class_indices(y, 5, np.random.default_rng(0))
    val = per_class_indices(y, 3, np.random.default_rng(1), exclude=train)
    assert np.bincount(y[train].numpy()).tolist() == [5] * 10 and np.bincount(y[val].numpy()).tolist() == [3] * 10
    assert not set(train) & set(val)
    cfg = lambda seed: load_config({"model": "resnet18", "data": dict(  # noqa: E731
        name="fewshot_digits", train_size=30, val_size=10, test_size=40, image_size=16, seed=seed)})["data"]
    a, b, c = build_datasets(cfg(0)), build_datasets(cfg(0)), build_datasets(cfg(1))
    assert (len(a.train), len(a.val), len(a.test)) == (30, 10, 40) and a.train[0][0].shape == (1, 16, 16)
    assert np.bincount(a.train.labels.numpy()).tolist() == [3] * 10
    assert torch.equal(a.train.images, b.train.images) and not torch.equal(a.train.images, c.train.images)
    with pytest.raises(ConfigError, match=r"'data.train_size' for fewshot_digits must be a multiple of 10"):
        load_config({"model": "resnet18", "data": dict(name="fewshot_digits", train_size=25)})


def test_transfer_run_and_report(tmp_path, one_thread, capsys):
    release, transfer = load_script("release"), load_script("transfer")
    configs, releases, out = tmp_path / "configs", tmp_path / "release", tmp_path / "transfer"
    for model, (arch, args) in {"d4": ("pe_resnet18", {}), "d4_strict": ("pe_resnet18", {"learn_likelihood": False}),
                                "resnet18": ("resnet18", {})}.items():
        name = f"{model}_rotmnist"
        write_release(configs, name, arch, args, f"pe_resnet18.{name}" if arch != "resnet18" else None)
    before = ["run", "--releases", str(releases), "--configs", str(configs), "--out", str(out), "--tasks", "digits",
              "--labels", "2", "--seeds", "0", "--image-size", "16"]
    transfer.main([*before, "--dry-run"])  # nothing built yet: the runs from scratch can go, the rest waits
    listed = capsys.readouterr().out
    assert "7 runs to do, waiting for d4_rotmnist, d4_strict_rotmnist, resnet18_rotmnist" in listed
    assert listed.count("from scratch") == 3 and "<- local-dir:" not in listed
    release.main(["build", "--configs", str(configs), "--out", str(releases)])
    run = ["run", "--releases", str(releases), "--configs", str(configs), "--out", str(out), "--tasks", "digits",
           "--labels", "2", "--seeds", "0", "--steps", "2", "--image-size", "16", "--test-size", "50", "--source", "hub"]
    with serve_hub(tmp_path / "server"):
        release.main(["publish", "--org", ORG, "--out", str(releases), "--registry", str(tmp_path / "reg.json")])
        revision = json.loads((releases / "d4_rotmnist" / "published.json").read_text())["revision"]
        transfer.main(run)
        capsys.readouterr()
        transfer.main(run)  # everything finished: nothing to do again
        assert "0 runs to do" in capsys.readouterr().out

    runs = out / "digits" / "k2"
    assert not list(out.glob("**/checkpoints"))  # finished runs keep their results, not their resume state
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        ["cnn-scratch", "cnn-finetuned", "strict-scratch", "strict-finetuned", "learnt-scratch", "learnt-finetuned",
         "learnt-frozen"])
    cfg = lambda run: yaml.safe_load((runs / run / "seed0" / "config.yaml").read_text())  # noqa: E731
    assert cfg("learnt-finetuned")["model"] == f"hf-hub:{ORG}/pe_resnet18.d4_rotmnist@{revision}"
    assert cfg("cnn-finetuned")["model"] == f"local-dir:{releases / 'resnet18_rotmnist' / 'stage'}"  # not published
    scratch = cfg("strict-scratch")
    assert scratch["model"] == "pe_resnet18" and scratch["model_args"]["learn_likelihood"] is False
    assert scratch["model_args"]["channels"] == [8, 8, 16, 16] and not scratch["pretrained"]
    assert cfg("learnt-scratch")["data"] == cfg("learnt-finetuned")["data"]  # the same labelled images
    # λ frozen keeps the checkpoint's distributions; fine-tuned, it moves
    coeffs = lambda folder: {k: lam.coefficients for k, lam in eqzoo.load_likelihoods(folder).items()}  # noqa: E731
    source = coeffs(releases / "d4_rotmnist" / "stage")
    frozen = coeffs(runs / "learnt-frozen" / "seed0" / "hub")
    tuned = coeffs(runs / "learnt-finetuned" / "seed0" / "hub")
    assert all(torch.equal(frozen[k], source[k]) for k in source)
    assert any(not torch.equal(tuned[k], source[k]) for k in source)

    transfer.main(["report", "--releases", str(releases), "--out", str(out)])
    table = (out / "transfer.md").read_text()
    assert (out / "transfer.png").stat().st_size > 0
    assert "| task | labels/class | cnn scratch | cnn fine-tuned |" in table
    row = next(line for line in table.splitlines() if line.startswith("| digits | 2 |"))
    assert row.count("(1)") == 7  # seven cells, one seed each
    assert "fine-tuned, seed0: conv1" in table and "checkpoint `d4_rotmnist`: conv1" in table

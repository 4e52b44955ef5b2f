"""Hostile and mistaken input: every bad argument, config.json, YAML, checkpoint, path and tensor
raises one clear error (or works as timm does) before anything costly happens; concurrent saves
and runs never mix; damaged checkpoints fall back; files keep the user's umask."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import eqzoo
from eqzoo import hub
from eqzoo._io import atomic_write, locked, save_tensors, sha256, write_json
from eqzoo.config import ConfigError, load_config
from eqzoo.hub import CheckpointError, HubConfigError
from eqzoo.cli import main
from eqzoo.train import RunDir, TrainingError, train
from trained import trained_looking

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "digits_c4.yaml"
SMALL = dict(group="D4", layers=[1, 1, 1, 1], stem_width=16, channels=[16, 16, 32, 32], num_classes=3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    m = timm.create_model("pe_resnet18", **SMALL)
    # distinct, learnt-looking λ per layer: sharing them would change the outputs
    return trained_looking(m, 0.5).eval()


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    return hub.save_pretrained(small, tmp_path_factory.mktemp("saved") / "model", plot=False)


def _copy(saved, tmp_path, name="copy"):
    return Path(shutil.copytree(saved, tmp_path / name))


def _edit_config(folder, fn):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def _load(folder, **kwargs):
    return timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)


# -- constructor arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=[1, 1, 1]), r"layers must be a list of 4 ints in \[1, 64\]"),
    (dict(stem_width=0), r"stem_width must be >= 1, got 0"),
    (dict(group="O2", field_bandlimit=-1), r"field_bandlimit must be >= 0"),
    (dict(group="O2", field_bandlimit=8), r"field_bandlimit is 8, above the maximum of 7.*MAX_FIELD_BANDLIMIT"),
    (dict(block="foo"), r"block must be 'basic', 'bottleneck' or a block class, got 'foo'"),
    (dict(learn_likelihood="no"), r"learn_likelihood must be true or false \(a bool\), got 'no'"),
    (dict(learn_likelihood="false"), r"learn_likelihood must be true or false"),
    (dict(zero_init_last="yes"), r"zero_init_last must be true or false \(a bool\), got 'yes'"),
    (dict(group=4), r"group must be a group spec string"),
    (dict(share_likelihood=True), r"share_likelihood must be one of \('layer', 'stage', 'model'\), got True"),
    (dict(drop_rate=2), r"drop_rate must be a number in \[0, 1\], got 2"),
    (dict(drop_path_rate="x"), r"drop_path_rate must be a number in \[0, 1\]"),
    (dict(bandlimit=1.5), r"bandlimit must be an int \(or null\), got 1.5"),
    (dict(basis="fourier"), r"basis must be one of \('auto', 'antialiased', 'complete'\)"),
    (dict(output_stride=16), r"output_stride 16 is not supported by pe models.*dilat"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        timm.create_model("pe_resnet18", **dict(SMALL, **kwargs))
    assert "\n" not in str(info.value)  # one line


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=15), r"depth must be 6n \+ 4"),
    (dict(channels=[16, 16, 32]), r"channels must be a list of 4 ints"),
    (dict(block_drop_rate=-0.5), r"block_drop_rate must be a number in \[0, 1\]"),
])
def test_bad_wrn_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("pe_wrn16_8", **kwargs)


def test_output_stride_32_is_timms_default(small):
    m = timm.create_model("pe_resnet18", output_stride=32, **SMALL)
    assert m.feature_info[-1]["reduction"] == 32


# -- config.json from the Hub is untrusted --------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    (lambda text: text[: len(text) // 2], r"config.json is not valid JSON \(.* at line \d+, column \d+\); it is truncated"),
    (lambda text: "", r"config.json is empty; it is truncated or corrupt"),
    (lambda text: "[1, 2, 3]", r"config.json: expected a JSON object .*got list"),
    (lambda text: '"pe_resnet18"', r"config.json: expected a JSON object .*got str"),
    (lambda text: "{}", r"config.json: 'architecture' is missing"),
    (lambda text: json.dumps(dict(json.loads(text), model_args=[1])), r"config.json: 'model_args' must be a JSON object"),
])
def test_damaged_config_json_is_named(saved, tmp_path, content, match):
    folder = _copy(saved, tmp_path)
    path = folder / "config.json"
    path.write_text(content(path.read_text()))
    with pytest.raises(HubConfigError, match=match) as info:
        hub.read_config(folder)  # eqzoo's reader, which eqzoo's own build path uses
    assert str(path) in str(info.value)
    # timm parses config.json before any eqzoo code runs (eqzoo does not patch timm's reader): its own
    # error, and nothing is built
    with pytest.raises((ValueError, KeyError, TypeError, AttributeError)):
        _load(folder)


def test_deeply_nested_config_json_is_named(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    path = folder / "config.json"
    path.write_text('{"architecture": "pe_resnet18", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(HubConfigError, match=r"config.json is not a config of timm's layout \(nested too deeply\)"):
        hub.read_config(folder)


@pytest.mark.parametrize("args, match", [
    (dict(learn_likelihood="false"), r"model_args\['learn_likelihood'\] must be true or false"),
    (dict(field_bandlimit=-1), r"model_args\['field_bandlimit'\] must be >= 0"),
    (dict(block="foo"), r"model_args\['block'\] must be 'basic', 'bottleneck'"),
    (dict(stem_width=0), r"model_args\['stem_width'\] must be >= 1"),
])
def test_hostile_model_args_in_config_json(saved, tmp_path, args, match):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c["model_args"].update(args))
    with pytest.raises(HubConfigError, match=match) as info:
        _load(folder)
    assert "config.json" in str(info.value)


# Requests that would exhaust the machine if a check were missing run in a child process whose
# address space is capped (a regression fails there instead of taking the machine), which counts
# the layers each refusal built and measures how much memory it touched.
SMALL_ARGS = dict(layers=[1, 1, 1, 1], stem_width=16, channels=[16, 16, 32, 32])
HUGE = {
    "config.json group D1000000": ("config", dict(group="D1000000"),
                                   r"config.json: model_args\['group'\] D1000000 has order 2000000, above the maximum of 32"),
    "config.json layers 10**9": ("config", dict(layers=[10**9] * 4),
                                 r"config.json: model_args\['layers'\] must be a list of 4 ints in \[1, 64\]"),
    "config.json channels 10**9": ("config", dict(channels=[10**9] * 4),
                                   r"config.json: model_args\['channels'\] must be a list of 4 ints in \[1, 8192\]"),
    "config.json num_classes 10**12": ("config", dict(num_classes=10**12),
                                       r"config.json: model_args\['num_classes'\] is 1000000000000, above the maximum"),
    # each value within its cap, together not: the whole-model check, naming the file
    "config.json 8192 wide, 64 deep": ("config", dict(stem_width=8192, channels=[8192] * 4, layers=[64] * 4),
                                       r"config.json: PEResNet: arguments give a model of about .* weights.*MAX_WEIGHTS"),
    "likelihoods.json group D1000000": ("likelihoods", dict(group="D1000000"),
                                        r"likelihoods.json: likelihood 'conv1.likelihood': group D1000000 has order"),
    "likelihoods.json bandlimit 10**9": ("likelihoods", dict(group="O2", bandlimit=10**9),
                                         r"likelihoods.json: likelihood 'conv1.likelihood': bandlimit is 1000000000"),
    "group D1000": ("resnet", dict(SMALL_ARGS, group="D1000"),
                    r"group D1000 has order 2000, above the maximum of 32 .*MAX_GROUP_ORDER"),
    "group C64": ("resnet", dict(group="C64", layers=[1, 1, 1, 1], stem_width=64, channels=[64] * 4),
                  r"group C64 has order 64, above the maximum of 32"),
    "layers 10**9": ("resnet", dict(SMALL_ARGS, layers=[10**9] * 4), r"layers must be a list of 4 ints in \[1, 64\].*MAX_BLOCKS"),
    "channels 10**9": ("resnet", dict(SMALL_ARGS, channels=[10**9] * 4), r"channels must be .*\[1, 8192\].*MAX_WIDTH"),
    "num_classes 10**12": ("resnet", dict(SMALL_ARGS, num_classes=10**12),
                           r"num_classes is 1000000000000, above the maximum of 100000 .*MAX_CLASSES"),
    "in_chans 10**6": ("resnet", dict(SMALL_ARGS, in_chans=10**6), r"in_chans is 1000000, above the maximum of 1024"),
    "O2 bandlimit 10**6": ("resnet", dict(SMALL_ARGS, group="O2", bandlimit=10**6),
                           r"bandlimit is 1000000, above the maximum of 32"),
    "O2 out_bandlimit 10**6": ("resnet", dict(SMALL_ARGS, group="O2", out_bandlimit=10**6),
                               r"out_bandlimit is 1000000, above the maximum of 32"),
    "8192 wide": ("resnet", dict(SMALL_ARGS, stem_width=8192, channels=[8192] * 4),
                  r"arguments give a model of about 2e\+10 weights .*MAX_WEIGHTS"),
    # one wide stage: counted as built (coefficients κ0, κ1, the twirled copy, the filter), not as
    # a plain convolution's 6e8 weights
    "one stage 8192 wide": ("resnet", dict(layers=[1, 1, 1, 1], stem_width=8, channels=[8192, 8, 8, 8]),
                            r"arguments give a model of about 2.4e\+09 weights .*MAX_WEIGHTS"),
    "wrn 8192 wide": ("wrn", dict(depth=10, channels=[8, 8192, 8, 8]), r"arguments give a model of about .*MAX_WEIGHTS"),
    "wrn depth 10**9": ("wrn", dict(depth=10**9), r"depth is 1000000000, above the maximum of 388"),
    "wrn widen_factor 10**6": ("wrn", dict(widen_factor=10**6), r"widen_factor is 1000000, above the maximum of 128"),
}

RESOURCE_SCRIPT = r"""
import json, resource, sys
import timm, eqzoo, eqzoo.nn

def status():
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(d[k].split()[0]) for k in ("VmRSS", "VmHWM", "VmSize")}

# every layer and likelihood that finishes its construction is counted: a refusal comes before any
built = [0]
for cls in (eqzoo.nn.PEConv2d, eqzoo.nn.PELinear, eqzoo.GroupLikelihood):
    def counted(self, *args, _init=cls.__init__, **kwargs):
        _init(self, *args, **kwargs)
        built[0] += 1
    cls.__init__ = counted

limit = (status()["VmSize"] + 2 * 1024**2) * 1024  # 2 GB more address space than after the imports
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
folders, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
build = {"config": lambda name, args: timm.create_model("local-dir:" + folders[name], pretrained=True),
         "likelihoods": lambda name, args: eqzoo.load_likelihoods("local-dir:" + folders[name]),
         "resnet": lambda name, args: timm.create_model("pe_resnet18", **args),
         "wrn": lambda name, args: timm.create_model("pe_wrn16_8", **args)}
out = {}
for name, (kind, args, _) in cases.items():
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    before, built[0] = status()["VmRSS"], 0
    try:
        build[kind](name, args)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    out[name] = {"built": built[0], "peak_mb": (status()["VmHWM"] - before) / 1024, "error": error}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def resource_use(saved, tmp_path_factory):
    base, folders = tmp_path_factory.mktemp("huge"), {}
    for name, (kind, args, _) in HUGE.items():
        if kind == "config":
            folders[name] = str(_copy(saved, base, f"case{len(folders)}"))
            top = {k: v for k, v in args.items() if k == "num_classes"}  # timm's top-level copy too
            _edit_config(Path(folders[name]), lambda c: (c["model_args"].update(args), c.update(top)))
        elif kind == "likelihoods":
            folders[name] = str(_copy(saved, base, f"case{len(folders)}"))
            path = Path(folders[name]) / "likelihoods.json"
            record = json.loads(path.read_text())
            record["likelihoods"]["conv1.likelihood"].update(args)
            path.write_text(json.dumps(record))
    proc = subprocess.run([sys.executable, "-c", RESOURCE_SCRIPT, json.dumps(folders), json.dumps(HUGE)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(HUGE))
def test_huge_requests_refused_before_building_and_small(resource_use, case):
    # "before building" instead of a time limit: a wall-clock bound would depend on the machine's load
    r = resource_use[case]
    assert r["error"] is not None and re.search(HUGE[case][2], r["error"]), r
    assert r["error"].startswith(("HubConfigError", "ModelArgError")) and "\n" not in r["error"], r
    assert r["built"] == 0 and r["peak_mb"] < 200, r


# -- no silent differences at load ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(share_likelihood="model"), r"share_likelihood='model' \(the checkpoint's: 'layer'\) would change"),
    (dict(head="learnt"), r"head='learnt' \(the checkpoint's: 'plain'\) would change"),
    (dict(group="C4"), r"group='C4' \(the checkpoint's: 'D4'\)"),
    (dict(basis="complete"), r"basis='complete'"),
])
def test_load_time_overrides_that_change_the_function_are_refused(saved, kwargs, match):
    with pytest.raises(HubConfigError, match=match):
        _load(saved, **kwargs)


def test_allowed_load_time_arguments(saved, small):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_load(saved, head="plain").eval()(x), small(x))  # equal to the saved head
        assert torch.equal(_load(saved, learn_likelihood=False).eval()(x), small(x))  # λ frozen, same function
    assert _load(saved, num_classes=5).num_classes == 5  # fine-tuning: a new head


def test_edited_sharing_caught_by_the_structure_fingerprint(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c["model_args"].update(share_likelihood="model"))
    with pytest.raises(CheckpointError, match=r"shares its likelihoods or has a head other than the checkpoint's"):
        _load(folder)


def test_weights_from_another_save_refused(saved, small, tmp_path):
    folder = _copy(saved, tmp_path)
    sd = {k: v.clone() for k, v in small.state_dict().items()}
    sd["conv1.weight"] += 1  # same shapes and names: only the recorded hash tells
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors is not the file config.json was saved with"):
        _load(folder)


def test_integer_weights_are_not_cast(saved, small, tmp_path):
    folder = _copy(saved, tmp_path)
    sd = {k: v.clone() for k, v in small.state_dict().items()}
    sd["conv1.weight"] = sd["conv1.weight"].to(torch.int32)
    save_file(sd, str(folder / "model.safetensors"))
    _edit_config(folder, lambda c: c["eqzoo"].update(weights_sha256=sha256(folder / "model.safetensors")))
    with pytest.raises(CheckpointError, match=r"tensor 'conv1.weight' is torch.int32 where the model has torch.float32"):
        _load(folder)


@pytest.mark.parametrize("dtype, match", [
    (torch.float16, r"PEConv2d: input dtype torch.float16 does not match the weights' torch.float32"),
    (torch.float64, r"input dtype torch.float64 does not match"),
    (torch.uint8, r"input dtype torch.uint8 .*x.float\(\) / 255"),
])
def test_input_dtype_must_match_as_in_timm(small, dtype, match):
    with pytest.raises(RuntimeError, match=match):
        small(torch.zeros(2, 3, 32, 32, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: allowed, as in timm
        if dtype.is_floating_point:
            small(torch.zeros(1, 3, 32, 32, dtype=torch.float32))


@pytest.mark.parametrize("group", ["D4", "O2"])
@pytest.mark.parametrize("head", ["plain", "learnt"])
def test_empty_batch(group, head):
    m = timm.create_model("pe_resnet18", **dict(SMALL, group=group, head=head))
    x = torch.zeros(0, 3, 32, 32)
    y = m.train()(x)
    y.sum().backward()
    assert y.shape == (0, 3) and m.eval()(x).shape == (0, 3)
    assert all(torch.isfinite(b).all() for b in m.buffers())  # no statistics learnt from nothing


def test_save_of_compiled_model_saves_the_model(small, tmp_path):
    folder = hub.save_pretrained(torch.compile(small), tmp_path / "compiled", plot=False)
    assert not any(k.startswith("_orig_mod") for k in load_file(str(folder / "model.safetensors")))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_load(folder).eval()(x), small(x))


@pytest.mark.parametrize("make, match", [
    (lambda m: eqzoo.export(m), r"has no eqzoo layers \(an eqzoo.export\(\) result"),
    (lambda m: timm.create_model("pe_resnet18", features_only=True, **{k: v for k, v in SMALL.items()
                                                                       if k != "num_classes"}),
     r"cannot save a timm feature extractor \(FeatureListNet, features_only=True\)"),
])
def test_save_refuses_what_config_json_cannot_rebuild(small, tmp_path, make, match):
    with pytest.raises(HubConfigError, match=match):
        hub.save_pretrained(make(small), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_save_refuses_a_folder_with_other_files(small, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files that are not part of a saved model \(notes.txt\)"):
        hub.save_pretrained(small, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- concurrent writers ------------------------------------------------------------------------------------
def test_concurrent_saves_leave_one_whole_folder(small, tmp_path):
    other = timm.create_model("pe_resnet18", **dict(SMALL, num_classes=5)).eval()
    target, errors = tmp_path / "shared", []

    def save(model):
        try:
            for _ in range(3):
                hub.save_pretrained(model, target, plot=False, export=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(m,)) for m in (small, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cfg = json.loads((target / "config.json").read_text())
    assert cfg["eqzoo"]["weights_sha256"] == sha256(target / "model.safetensors")
    assert load_file(str(target / "model.safetensors"))["fc.weight"].shape[0] == cfg["num_classes"]
    assert _load(target).num_classes == cfg["num_classes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no temporary folders left


def tiny(out, **over):
    cfg = yaml.safe_load(TINY.read_text())
    cfg.update(output=str(out), tensorboard=False, progress=False)
    cfg["data"].update(train_size=64, val_size=16, test_size=16)
    cfg["schedule"].update(epochs=2, warmup_epochs=0)
    for k, v in over.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    return cfg


def test_concurrent_runs_into_one_folder(tmp_path):
    out, results = tmp_path / "run", []

    def run():
        try:
            results.append(train(tiny(out, schedule={"epochs": 1})))
        except TrainingError as e:
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finished = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, TrainingError)]
    assert len(finished) == 1 and len(refused) == 1, results
    assert "another eqzoo run is writing to" in str(refused[0]) or "already holds a run" in str(refused[0])
    assert json.loads((out / "results.json").read_text())["best_epoch"] == 1


def test_a_run_holding_the_folder_refuses_others(tmp_path):
    out = tmp_path / "run"
    with locked(out / RunDir.LOCK):  # as a run in progress holds it
        with pytest.raises(TrainingError, match="another eqzoo run is writing to"):
            train(tiny(out))
    assert not (out / "config.yaml").exists()


# -- checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 3-epoch run, and one stopped after epoch 2 (both checkpoints kept)."""
    base = tmp_path_factory.mktemp("ckpt")
    full = train(tiny(base / "full", schedule={"epochs": 3}))
    train(tiny(base / "stopped", schedule={"epochs": 3}), stop_after_epoch=2)
    return base / "full", base / "stopped", full


def test_previous_checkpoint_is_kept(reference_run):
    _, stopped, _ = reference_run
    assert [p.name for p in RunDir(stopped).checkpoints()] == ["epoch-0002", "epoch-0001"]


def _poison(path):
    tensors = load_file(str(path))
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path))


def _edit_state(run, fn):
    path = run / "checkpoints/epoch-0002/state.json"
    state = json.loads(path.read_text())
    fn(state)
    path.write_text(json.dumps(state))


def _final_weights(run):
    return load_file(str(run / "checkpoints" / "epoch-0003" / "model.safetensors"))


@pytest.mark.parametrize("damage, problem, start", [
    (lambda run: (run / "checkpoints/epoch-0002/model.safetensors").write_bytes(b"\0" * 100),
     r"epoch-0002/model.safetensors is not a valid safetensors file", "epoch-0001"),
    (lambda run: (run / "checkpoints/epoch-0002/state.json").write_text('{"epoch": '),
     r"epoch-0002/state.json is not valid JSON", "epoch-0001"),
    # latest.json naming another run's checkpoint: ignored, this run's newest good one is used
    (lambda run: (run / "checkpoints/latest.json").write_text(json.dumps({"dir": "../../full/checkpoints/epoch-0003"})),
     r"names '../../full/checkpoints/epoch-0003', which is not a checkpoint of this run", "epoch-0002"),
    # non-finite tensors, and state.json values that do not fit the run
    (lambda run: _poison(run / "checkpoints/epoch-0002/model.safetensors"),
     r"epoch-0002/model.safetensors: tensor '[\w.]+' holds NaN or infinite values", "epoch-0001"),
    (lambda run: _poison(run / "checkpoints/epoch-0002/optimizer.safetensors"),
     r"epoch-0002/optimizer.safetensors: tensor 'state\.\d+\.exp_avg\w*' holds NaN or infinite values", "epoch-0001"),
    (lambda run: _edit_state(run, lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan"))),
     r"epoch-0002/state.json is damaged .*optimizer.param_groups.0.lr is not a finite number", "epoch-0001"),
    (lambda run: _edit_state(run, lambda s: s["rng"][0].update(torch="AAAA")),
     r"epoch-0002/state.json is damaged \(RuntimeError", "epoch-0001"),
    (lambda run: _edit_state(run, lambda s: s.update(step=3)),
     r"epoch-0002/state.json is damaged .*step 3 is not epoch 2 times the 2 steps of an epoch", "epoch-0001"),
    (lambda run: _edit_state(run, lambda s: s["optimizer"].update(param_groups=s["optimizer"]["param_groups"][:1])),
     r"epoch-0002/state.json is damaged \(ValueError", "epoch-0001"),
    (lambda run: (run / "checkpoints/epoch-0002/state.json").write_text("[" * 100_000 + "]" * 100_000),
     r"epoch-0002/state.json is not valid JSON", "epoch-0001"),
])
def test_damaged_latest_checkpoint_falls_back(reference_run, tmp_path, capsys, damage, problem, start):
    full, stopped, _ = reference_run
    run = Path(shutil.copytree(stopped, tmp_path / "run"))
    damage(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.search(problem, warnings[0]), out
    assert f"resuming {run} from {start}" in out
    a, b = _final_weights(full), _final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resume is exact from either checkpoint


def test_no_usable_checkpoint(reference_run, tmp_path, capsys):
    _, stopped, _ = reference_run
    run = Path(shutil.copytree(stopped, tmp_path / "run"))
    for folder in RunDir(run).checkpoints():
        (folder / "model.safetensors").write_bytes(b"")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "no usable checkpoint" in err and "Traceback" not in err


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import eqzoo.train.loop as engine  # the epoch loop, which calls lambda_kl

    calls, real = [], engine.lambda_kl

    def interrupt_in_epoch_2(model):
        calls.append(1)
        if len(calls) == 4:  # two calls per epoch: the 4th is in epoch 2
            raise KeyboardInterrupt
        return real(model)

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(tmp_path / "run")))
    monkeypatch.setattr(engine, "lambda_kl", interrupt_in_epoch_2)
    assert main(["train", "--config", str(cfg)]) == 130
    err = capsys.readouterr().err
    assert f"resume from epoch-0001 with: eqzoo train --resume {tmp_path / 'run'}" in err
    assert "Traceback" not in err
    monkeypatch.setattr(engine, "lambda_kl", real)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0


# -- configs and the CLI -------------------------------------------------------------------------------------
def test_string_boolean_override_fails_before_training(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(tmp_path / "run")))
    with pytest.raises(ConfigError, match=r"'model_args.learn_likelihood' must be true or false \(a bool\), got 'false'"):
        load_config(cfg, ['model_args.learn_likelihood="false"'])
    assert main(["train", "--config", str(cfg), 'model_args.learn_likelihood="false"']) == 2
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"'model_args.group'.*D1000000 has order 2000000"):
        load_config(cfg, ["model_args.group=D1000000"])
    with pytest.raises(ConfigError, match=r"'model_args.layrs' is an unknown key for pe_resnet18 \(did you mean 'layers'\?\)"):
        load_config(cfg, ["model_args.layrs=[1,1,1,1]"])


def test_model_args_cross_check_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'model_args.group' D8 has regular fields of 16 channels"):
        train(tiny(tmp_path / "run", model_args={"group": "D8"}))  # widths 8 and 16
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data, match", [
    ({"image_size": 10**5}, r"'data.image_size' is 100000, above the maximum of 1024"),
    ({"train_size": 10**12}, r"'data.train_size' is 1000000000000, above the maximum of 10000000"),
    ({"batch_size": 10**9}, r"'data.batch_size' is 1000000000, above the maximum of 65536"),
    ({"name": "ddmnist", "symmetry": ["C1", "SO2"], "image_size": 1024, "train_size": 10**6, "val_size": 0,
      "test_size": 0}, r"would take [\d.]+ GiB, above the maximum of 4 GiB"),
])
def test_data_sizes_are_capped(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(tiny(tmp_path / "run", data=data))


def test_damaged_likelihoods_json(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    path = folder / "likelihoods.json"
    record = json.loads(path.read_text())
    del record["likelihoods"]["conv1.likelihood"]["group"]
    path.write_text(json.dumps(record))
    with pytest.raises(HubConfigError, match=r"likelihoods.json: likelihood 'conv1.likelihood' has no 'group'"):
        eqzoo.load_likelihoods(folder)
    path.write_text('{"likelihoods": [')
    with pytest.raises(HubConfigError, match=r"likelihoods.json is not valid \(JSONDecodeError"):
        eqzoo.load_likelihoods(folder)


def test_duplicate_yaml_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(TINY.read_text().replace("optim:\n  name: adamw\n", "optim:\n  name: adamw\n  lr: 1.0\n"))
    with pytest.raises(ConfigError, match=r"dup.yaml: not valid YAML: .*duplicate key 'lr' \(first given on line \d+\)"):
        load_config(path)


@pytest.mark.parametrize("argv, match", [
    (["eval", "runs/no-such-run"], "runs/no-such-run: no such run or model folder"),
    (["inspect", "runs/no-such-run"], "runs/no-such-run: no such run or model folder"),
    (["inspect", "local-dir:/no/such/folder"], "local-dir:/no/such/folder: no such folder"),
    (["inspect", "not_a_model"], "not_a_model: neither a run or model folder nor a timm model name"),
    (["finetune", "--config", str(TINY), "--from", "runs/no-such-run"], "runs/no-such-run: no such run or model folder"),
    (["train", "--config", str(TINY), "model_args.group=D1000"], "D1000 has order 2000"),
])
def test_cli_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_cli_debug_shows_the_traceback(capsys):
    assert main(["--debug", "inspect", "runs/no-such-run"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["inspect", "runs/no-such-run", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_finetune_from_uses_the_source_architecture(reference_run, tmp_path, capsys):
    full, _, _ = reference_run
    cnn = yaml.safe_load((ROOT / "configs" / "digits_cnn.yaml").read_text())  # the README's example
    cnn.update(output=str(tmp_path / "ft"), tensorboard=False, progress=False)
    cnn["data"].update(train_size=32, val_size=16, test_size=16)
    cnn["schedule"].update(epochs=1, warmup_epochs=0)
    cfg = tmp_path / "cnn.yaml"
    cfg.write_text(yaml.safe_dump(cnn))
    assert main(["finetune", "--config", str(cfg), "--from", str(full), "model_args.drop_rate=0.1"]) == 0
    note = capsys.readouterr().err
    assert "the config's model (resnet18) and model_args (" in note and "are not used" in note
    assert all(k in note for k in ("layers", "stem_width", "channels"))
    recorded = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert recorded["model"] == f"local-dir:{full / 'hub'}" and recorded["model_args"] == {"drop_rate": 0.1}
    saved = json.loads((tmp_path / "ft" / "hub" / "config.json").read_text())
    assert saved["architecture"] == "pe_resnet18" and saved["model_args"]["layers"] == [1, 1, 1, 1]


# -- file modes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_users_umask(small, tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = hub.save_pretrained(small, tmp_path / "model", plot=False)
        write_json(tmp_path / "a.json", {})
        save_tensors({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
        atomic_write(tmp_path / "cache.npz", lambda p: p.write_bytes(b"x"))  # the basis cache's writer
    finally:
        os.umask(old)
    files = [tmp_path / "a.json", tmp_path / "a.safetensors", tmp_path / "cache.npz"] + \
        [p for p in folder.rglob("*") if p.is_file()]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}
    dirs = [folder] + [p for p in folder.rglob("*") if p.is_dir()]
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {oct(0o777 & ~umask)}


def test_older_hub_format_is_refused(saved, tmp_path):
    """Folders of an older format (none was ever published) are refused with a message saying so,
    rather than loaded by compatibility rules (such as an older default basis)."""
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c["eqzoo"].update(hub_format=hub.HUB_FORMAT - 1))
    with pytest.raises(HubConfigError, match=rf"hub format {hub.HUB_FORMAT - 1} is older than the format "
                                             rf"{hub.HUB_FORMAT} this eqzoo .* reads.*save the model again"):
        _load(folder)
    folder = _copy(saved, tmp_path, "without_basis")
    _edit_config(folder, lambda c: c["model_args"].pop("basis"))  # the default basis, checked by the fingerprint
    model = _load(folder)
    assert model.model_args["basis"] == "auto"


# -- run configs, training and resume ----------------------------------------------------------------------------
_BOMB = "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))  # 10**9 values once expanded


@pytest.mark.parametrize("text, match", [
    (_BOMB, r"bad.yaml: more than 100000 values once its YAML aliases are expanded \(eqzoo._yaml.MAX_CONFIG_NODES\)"),
    ("x: " + "[" * 1500 + "]" * 1500, r"bad.yaml: nested more than 32 deep \(eqzoo._yaml.MAX_CONFIG_DEPTH\)"),
    ('{"model_args": {"x": ' + "[" * 40 + "]" * 40 + "}}", r"bad.yaml: nested more than 32 deep"),  # JSON
    ("a: &a [1, *a]", r"bad.yaml: a YAML alias refers to a node that contains it"),
    ("x: " + "1" * (1 << 20), r"bad.yaml: \d+ bytes, above the maximum of 1048576"),
])
def test_config_files_are_read_within_bounds(tmp_path, capsys, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(match, err) and len(err.splitlines()) == 1, err


def test_override_values_are_read_within_bounds():
    value = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"&b{i} [{', '.join([f'*b{i - 1}' if i > 1 else '*a'] * 10)}]" for i in range(1, 8)) + "]"
    with pytest.raises(ConfigError, match=r"override model_args.x: more than 100000 values"):
        load_config(TINY, [f"model_args.x={value}"])


@pytest.mark.parametrize("override, match", [
    ("optim.lr=.inf", r"config key 'optim.lr' must be a finite number, got inf"),
    ("optim.weight_decay=.nan", r"config key 'optim.weight_decay' must be a finite number, got nan"),
    ("regularizer.alignment=.nan", r"config key 'regularizer.alignment' must be a finite number, got nan"),
    ("schedule.warmup_epochs=-.inf", r"config key 'schedule.warmup_epochs' must be a finite number, got -inf"),
    ("optim.betas=[.nan,0.9]", r"config key 'optim.betas.0' must be a finite number, got nan"),
    ("model_args.drop_rate=.nan", r"config key 'model_args.drop_rate' must be a finite number, got nan"),
    ("optim.lr=100", r"config key 'optim.lr' is 100, above the maximum of 10"),
    ("optim.weight_decay=5", r"config key 'optim.weight_decay' is 5, above the maximum of 1"),
    ("regularizer.kl_chain=1e9", r"config key 'regularizer.kl_chain' is 1000000000.0, above the maximum of 10000.0"),
    ("optim.momentum=1", r"config key 'optim.momentum' is 1, above the maximum of 0.9999"),
    ("schedule.min_lr=1", r"config key 'schedule.min_lr' \(1\) must not exceed optim.lr"),
    ("output=.", r"config key 'output' must name a run folder of its own"),
    ("output=''", r"config key 'output' must name a run folder of its own"),
])
def test_run_config_numbers_are_finite_and_bounded(tmp_path, capsys, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])
    assert main(["train", "--config", str(TINY), override]) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("term, step", [("kl_chain", 3), ("task loss (cross-entropy)", 7)])
def test_non_finite_loss_stops_at_once(tmp_path, monkeypatch, term, step):
    import eqzoo.train.loop as loop

    calls, real_reg, real_ce = [], loop.regularization, loop.F.cross_entropy

    def reg(model, **kw):
        total, parts = real_reg(model, **kw)
        calls.append(1)
        if term == "kl_chain" and len(calls) == step:
            parts = dict(parts, kl_chain=parts["kl_chain"] * float("nan"))
        return total, parts

    def ce(logits, y, **kw):
        out = real_ce(logits, y, **kw)
        return out * float("inf") if term.startswith("task") and len(calls) == step - 1 and logits.requires_grad else out

    monkeypatch.setattr(loop, "regularization", reg)
    monkeypatch.setattr(loop.F, "cross_entropy", ce)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=rf"non-finite loss at step {step} \(epoch {1 + (step > 4)}\): "
                                            rf"{re.escape('regulariser ' + term if term == 'kl_chain' else term)} ="):
        train(tiny(out, data={"train_size": 128}))  # 4 steps per epoch
    assert not (out / "hub").exists() and not (out / "results.json").exists()
    if step <= 4:  # stopped before the first checkpoint: nothing is left that blocks the same command
        assert RunDir(out).holds_run() == []
        monkeypatch.undo()
        assert train(tiny(out, data={"train_size": 128}, schedule={"epochs": 1}))["status"] == "finished"
    else:
        assert [p.name for p in RunDir(out).checkpoints()] == ["epoch-0001"]


def test_resume_checks_the_config_pinned_by_the_checkpoint(reference_run, tmp_path, capsys):
    _, stopped, _ = reference_run
    run = Path(shutil.copytree(stopped, tmp_path / "run"))
    saved = run / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    cfg["optim"]["lr"] = 0.5  # an edit of the run's own config.yaml between stop and resume
    saved.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "differs from the one its checkpoint epoch-0002 was trained with in optim.lr" in err, err
    cfg["optim"]["lr"] = yaml.safe_load(TINY.read_text())["optim"]["lr"]
    saved.write_text(yaml.safe_dump(cfg))
    # an override after --resume is an override, not the run folder
    assert main(["train", "--config", str(saved), "--resume", "schedule.epochs=4"]) == 2
    assert "in schedule.epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "device=cpu"]) == 0


def test_overwrite_removes_links_not_what_they_point_to(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    assert train(tiny(out, schedule={"epochs": 1}), overwrite=True)["status"] == "finished"
    assert (elsewhere / "keep.txt").read_text() == "x" and (out / "checkpoints").is_dir()
    link = tmp_path / "file-link"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(TrainingError, match=r"output .*file-link is not a folder \(a file, or a link to nothing\)"):
        train(tiny(link), overwrite=True)


@pytest.mark.parametrize("size", ["0", "-3", "100000", "x"])
def test_equivariance_size_is_bounded(capsys, size):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "pe_resnet18", "--equivariance", size])
    assert e.value.code == 2
    assert f"SIZE must be an integer in [8, 512], got '{size}'" in capsys.readouterr().err


def test_eval_takes_overrides_after_its_options(reference_run, tmp_path):
    full, _, _ = reference_run
    out = tmp_path / "eval.json"
    assert main(["eval", str(full), "--config", str(full / "config.yaml"), "--output", str(out), "data.test_size=8"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 8 and 0 <= result["acc"] <= result["top5"] <= 1



# -- weights and arguments at load: every path into a pe model --------------------------------------------------
def _layer_shared(small, tmp_path):
    """model.safetensors of ``small`` (one λ per layer, all different) as a bare file."""
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("how", ["checkpoint_path", "overlay_file", "load_state_dict"])
def test_weights_saved_with_other_sharing_are_refused(small, tmp_path, how):
    path = _layer_shared(small, tmp_path)
    match = r"tensors '.*likelihood.*' and '.*likelihood.*' differ, but this model shares one parameter.*'model'"
    with pytest.raises(CheckpointError, match=match) as info:
        if how == "checkpoint_path":
            timm.create_model("pe_resnet18", share_likelihood="model", checkpoint_path=str(path), **SMALL)
        elif how == "overlay_file":
            timm.create_model("pe_resnet18", pretrained=True, share_likelihood="model",
                              pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
        else:
            timm.create_model("pe_resnet18", share_likelihood="model", **SMALL).load_state_dict(load_file(str(path)))
    assert "\n" not in str(info.value)
    if how == "overlay_file":
        assert str(path) in str(info.value)
    # the same weights into a model that shares as they were saved: loaded
    same = timm.create_model("pe_resnet18", checkpoint_path=str(path), **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same(x), small(x))


@pytest.mark.parametrize("key", ["conv1.weight", "conv1.likelihood.coefficients"])
def test_non_finite_weights_are_refused(saved, small, tmp_path, key):
    folder = _copy(saved, tmp_path)
    sd = {k: v.clone() for k, v in small.state_dict().items()}
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(folder / "model.safetensors"))
    _edit_config(folder, lambda c: c["eqzoo"].update(weights_sha256=sha256(folder / "model.safetensors")))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{re.escape(key)}' holds NaN or infinite"):
        _load(folder)


@pytest.mark.parametrize("weights, match", [
    ("resnet18", r"layer.safetensors: the weights do not fit this PEResNet: (Missing key|size mismatch)"),  # plain timm
    ("C4", r"layer.safetensors: the weights do not fit this PEResNet: .*"),  # another group
])
def test_weights_of_another_model_are_one_line_errors(tmp_path, weights, match):
    other = timm.create_model(weights, num_classes=3) if weights == "resnet18" else \
        timm.create_model("pe_resnet18", **dict(SMALL, group="C4"))
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=match) as info:
        timm.create_model("pe_resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert "\n" not in str(info.value)


def test_overlay_file_keeps_a_head_that_fits(small, tmp_path, caplog):
    path = _layer_shared(small, tmp_path)
    with caplog.at_level("WARNING"):
        m = timm.create_model("pe_resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert not [r for r in caplog.records if "classifier" in r.getMessage() or "1000" in r.getMessage()]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), small(x))


@pytest.mark.parametrize("group", ["D04", "C08", "D\u0664", "C\uff14", "D 4", "D4\n"])
def test_group_spelling_is_exact(group):
    with pytest.raises(ValueError, match=r"group must be .*group") as info:
        timm.create_model("pe_resnet18", group=group, **{k: v for k, v in SMALL.items() if k != "group"})
    assert "\n" not in str(info.value).replace(repr(group), "")


@pytest.mark.parametrize("kwargs, match", [
    (dict(drop_rate=float("nan")), r"drop_rate must be a finite number, got nan"),
    (dict(drop_path_rate=float("inf")), r"drop_path_rate must be a finite number, got inf"),
    (dict(act_layer="gelu"), r"act_layer is not supported by pe_resnet18 .*accepts: block, layers, .*group"),
    (dict(stem_type="deep", aa_layer=None, norm_layer="bn"), r"norm_layer, stem_type are not supported by pe_resnet18"),
    (dict(counterpart="hf-hub:attacker/anything"), r"counterpart is not supported by pe_resnet18"),
])
def test_model_arguments_at_build(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        timm.create_model("pe_resnet18", **dict(SMALL, **kwargs))
    assert "\n" not in str(info.value)


def test_unknown_keywords_are_type_errors():
    # timm's contract: an unknown constructor keyword raises TypeError, as Python's own does
    with pytest.raises(TypeError, match=r"not_a_model_arg is not supported by pe_resnet18"):
        timm.create_model("pe_resnet18", not_a_model_arg=1, **SMALL)


def test_likelihood_band_limits_are_capped():
    with pytest.raises(ValueError, match=r"GroupLikelihood: bandlimit is 1000000, above the maximum of 32"):
        eqzoo.GroupLikelihood("O2", bandlimit=10**6)
    with pytest.raises(ValueError, match=r"GroupLikelihood: out_bandlimit is 1000000, above the maximum of 32"):
        eqzoo.GroupLikelihood("O2", out_bandlimit=10**6)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["model_args"].update(counterpart="hf-hub:attacker/anything"),
     r"model_args\['counterpart'\] is an unknown key for pe_resnet18"),
    (lambda c: c["model_args"].update(drop_rate=1e308 * 10), r"model_args\['drop_rate'\] must be"),
    (lambda c: c.update(pretrained_cfg=None) or c.pop("pretrained_cfg"),
     r"config.json: no 'pretrained_cfg' object \(timm's layout"),
])
def test_saved_folders_name_no_sources_and_say_what_is_missing(saved, tmp_path, edit, match):
    folder = _copy(saved, tmp_path)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))  # NaN/inf are written as the JSON extensions Python reads back
    with pytest.raises(HubConfigError, match=match):
        _load(folder)


# -- saving and the Hub's files --------------------------------------------------------------------------------
def _edit_likelihoods(folder, fn):
    path = folder / "likelihoods.json"
    record = json.loads(path.read_text())
    fn(record["likelihoods"])
    path.write_text(json.dumps(record))  # NaN/inf are written as the JSON extensions Python reads back


def _set_first(key, index, value):
    def edit(entries):
        entry = entries["conv1.likelihood"]
        (entry["grid"] if key == "density" else entry)[key][index] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set_first("coefficients", 0, float("nan")),
     r"likelihoods.json: likelihood 'conv1.likelihood': coefficients\[0\] is nan; every number must be finite"),
    (_set_first("coefficients", 1, float("-inf")), r"'conv1.likelihood': coefficients\[1\] is -inf"),
    (_set_first("density", 3, float("inf")), r"'conv1.likelihood': grid.density\[3\] is inf"),
    (_set_first("coefficients", 0, 1e308), r"'conv1.likelihood': coefficients\[0\] is 1e\+308, beyond float32's range"),
    (lambda entries: entries.update({f"extra{i}": {} for i in range(1024)}),
     r"likelihoods.json has 1036 likelihoods, above the maximum of 1024"),
])
def test_likelihoods_json_is_bounded_and_finite(saved, tmp_path, edit, match):
    folder = _copy(saved, tmp_path)
    _edit_likelihoods(folder, edit)
    with pytest.raises(HubConfigError, match=match) as info:
        eqzoo.load_likelihoods(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_likelihoods_json_size_is_bounded(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    path = folder / "likelihoods.json"
    path.write_text(path.read_text() + " " * hub.likelihoods.MAX_LIKELIHOODS_BYTES)  # valid JSON, too big
    with pytest.raises(HubConfigError, match=r"likelihoods.json is 16.\d MiB, above the maximum of 16 MiB"):
        eqzoo.load_likelihoods(folder)
    path.write_text("[" * 100_000 + "]" * 100_000)  # small, but nested past any parser's depth
    with pytest.raises(HubConfigError, match=r"likelihoods.json is not valid \(nested too deeply\)"):
        eqzoo.load_likelihoods(folder)


def test_offline_cache_miss_says_offline(tmp_path):
    from hub_server import offline, serve_hub

    with serve_hub(tmp_path) as server:
        with offline(), pytest.raises(FileNotFoundError, match=r"likelihoods.json of hf-hub:eqzoo-test/never-fetched "
                                                               r"is not in the offline cache \(HF_HUB_OFFLINE is set\)"):
            eqzoo.load_likelihoods("hf-hub:eqzoo-test/never-fetched")
        server.stop()  # online, but the Hub cannot be reached
        with pytest.raises(FileNotFoundError, match=r"not in the local cache and the Hub cannot be reached"):
            eqzoo.load_likelihoods("hf-hub:eqzoo-test/never-fetched")


@pytest.mark.parametrize("model_args, match", [
    (dict(group="C4"), r"model_args\['group'\] = 'C4' disagrees with the model, which has group = 'D4'"),
    (dict(layers=[2, 2, 2, 2]), r"model_args\['layers'\] = \[2, 2, 2, 2\] disagrees with the model"),
    (dict(num_classes=7), r"model_args\['num_classes'\] = 7 disagrees with the model, which has num_classes = 3"),
])
def test_save_refuses_model_args_that_disagree_with_the_model(small, tmp_path, model_args, match):
    with pytest.raises(HubConfigError, match=match):
        hub.save_pretrained(small, tmp_path / "out", model_args=model_args, plot=False)
    assert not list(tmp_path.iterdir())  # refused before anything is written
    hub.save_pretrained(small, tmp_path / "out", model_args=dict(group="D4", basis="auto"), plot=False,
                        export=False)  # what the model has: accepted


def test_save_through_a_symbolic_link(small, tmp_path):
    target = tmp_path / "models" / "v1"
    target.mkdir(parents=True)
    link = tmp_path / "latest"
    link.symlink_to(target, target_is_directory=True)
    for _ in range(2):  # into an empty target, then replacing a saved one
        hub.save_pretrained(small, link, plot=False, export=False)
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["v1"]  # no temporaries left
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_load(link).eval()(x), small(x))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_killed_writes_leave_nothing_behind_after_the_next(small, tmp_path):
    from eqzoo._io import HOST_TAG

    target, dead, alive = tmp_path / "model", _dead_pid(), os.getpid()
    stale = [tmp_path / f".model.{HOST_TAG}.{dead}.0123abcd.new", tmp_path / f".model.{HOST_TAG}.{dead}.89abcdef.old"]
    kept = [tmp_path / f".model.{HOST_TAG}.{alive}.00000000.new",  # a save of this process, in progress
            tmp_path / f".model.0badc0de.{dead}.0123abcd.new",  # another machine's (a shared file system)
            tmp_path / f".other.{HOST_TAG}.{dead}.0123abcd.new"]  # another target's: not this save's business
    for folder in stale + kept:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    hub.save_pretrained(small, target, plot=False, export=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model"] + [p.name for p in kept])
    # the same for a single file's temporary
    (tmp_path / f".a.json.{HOST_TAG}.{dead}.0123abcd.tmp").write_text("{")
    write_json(tmp_path / "a.json", {})
    assert not list(tmp_path.glob(".a.json.*"))


def test_io_needs_no_fcntl(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows, where fcntl does not exist
    spec = importlib.util.spec_from_file_location("eqzoo._io_without_fcntl", ROOT / "eqzoo" / "_io.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.locked(tmp_path / "lock") as got, locked(tmp_path / "lock", blocking=False) as again:
        assert got and not again


@pytest.mark.parametrize("exported", [{"architecture": "hf-hub:attacker/anything", "path": "exported"},
                                      {"architecture": "resnet18", "path": "/elsewhere"}, "resnet18"])
def test_saved_plain_counterpart_is_a_timm_architecture(saved, tmp_path, exported):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c["eqzoo"].update(exported=exported))
    with pytest.raises(HubConfigError, match=r"config.json: eqzoo.exported must be \{\"architecture\": a timm model"):
        _load(folder)
    with pytest.raises(HubConfigError, match=r"eqzoo.exported must be"):
        hub.read_config(folder)


def test_stop_after_epoch_is_positive(capsys):
    for value in ("0", "-3", "x"):
        with pytest.raises(SystemExit):
            main(["train", "--config", str(TINY), "--stop-after-epoch", value])
        assert f"must be an integer >= 1, got '{value}'" in capsys.readouterr().err


def test_best_weights_and_regulariser_weights_are_finite(tmp_path, small):
    from eqzoo.errors import CheckpointError
    from eqzoo.train.checkpoint import finite_tensors

    path = tmp_path / "best.safetensors"
    save_tensors({"fc.weight": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([3])}, path)
    with pytest.raises(CheckpointError, match=r"best.safetensors: tensor 'fc.weight' holds NaN or infinite values"):
        finite_tensors(path)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=r"regulariser weight kl_chain must be a finite number >= 0"):
            eqzoo.regularization(small, kl_chain=bad)


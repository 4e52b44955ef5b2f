"""The release: official checkpoints of registered architectures, built, staged and published.

    python scripts/release.py build [NAME ...] [--configs configs/release] [--out runs/release]
    python scripts/release.py speed [NAME ...] [--batches 64 256] [--steps 10]
    python scripts/release.py report [--out runs/release]
    python scripts/release.py publish --org ORG [NAME ...] [--endpoint URL] [--registry FILE]

One checkpoint = one file ``configs/release/NAME.yaml``: a ``release`` section (its registry
``tag``, whether to ``publish`` it, the Hub ``repo`` name, a ``dataset`` line for the card, and
``recipe``: ``placeholder`` until the batch, epochs and learning rate are chosen by measurement)
and a ``train`` section, the eqzoo run config (``eqzoo train --config``) that trains it. A change
to the ``train`` section after a build is refused; a change to the ``release`` section re-stages
the same weights with a new card.

``build`` trains each checkpoint with ``eqzoo.train.train`` into ``OUT/NAME/run`` (a finished one
is skipped, a killed one resumes from its last epoch, so a build continues across sessions),
stages it as a Hub repo folder in ``OUT/NAME/stage`` (weights, config.json, likelihoods.json/png,
and a card with the test accuracy in its model-index, the command and commit, the validation
curve, the wall time and the λ read-out per layer), evaluates the staged folder with
``eqzoo.train.evaluate`` (what ``eqzoo eval`` runs) and records everything in
``OUT/NAME/release.json``. ``report`` writes ``OUT/release.md`` and ``OUT/curves.png``.

``publish`` uploads every staged checkpoint marked ``publish: true`` to ``ORG/REPO`` (one Hub
repo each), records the commit it made, and writes the registry (default: the package's
``eqzoo/models/published.json``, or ``$EQZOO_PUBLISHED``): one tag per checkpoint with its model
arguments, the pinned commit and the weights' sha256, which eqzoo checks at every load.
``--endpoint`` names another Hub (``HF_ENDPOINT``), e.g. a local test server.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASE_KEYS = {"tag": (str, type(None)), "publish": bool, "repo": (str, type(None)), "dataset": str,
                "recipe": str, "description": str}
RECIPES = ("placeholder", "measured")


# -- the manifest ------------------------------------------------------------------------------------
def read_release(path: Path, out: Path) -> dict:
    """``{"name", "release", "train"}`` of one release file, checked; ``train`` is the resolved run
    config writing into ``OUT/NAME/run``."""
    from eqzoo.config import load_config, read_yaml
    from eqzoo.errors import ConfigError

    raw = read_yaml(path)
    unknown = set(raw) - {"release", "train"}
    if unknown or "release" not in raw or "train" not in raw:
        raise ConfigError(f"{path}: a release file has exactly two sections, 'release' and 'train'"
                          + (f" (unknown: {', '.join(sorted(map(str, unknown)))})" if unknown else ""))
    rel = dict(raw["release"] or {})
    for key, types in RELEASE_KEYS.items():
        if key not in rel:
            raise ConfigError(f"{path}: release.{key} is missing; keys: {', '.join(RELEASE_KEYS)}")
        if not isinstance(rel[key], types):
            raise ConfigError(f"{path}: release.{key} has the wrong type ({rel[key]!r})")
    extra = set(rel) - set(RELEASE_KEYS)
    if extra:
        raise ConfigError(f"{path}: unknown keys release.{', release.'.join(sorted(extra))}; "
                          f"accepted: {', '.join(RELEASE_KEYS)}")
    if rel["recipe"] not in RECIPES:
        raise ConfigError(f"{path}: release.recipe must be one of {', '.join(RECIPES)}, got {rel['recipe']!r}")
    if rel["publish"] and not (rel["tag"] and rel["repo"]):
        raise ConfigError(f"{path}: a published checkpoint needs release.tag (ARCH.NAME) and release.repo")
    train = dict(raw["train"] or {})
    if rel["tag"] and rel["tag"].split(".")[0] != train.get("model"):
        raise ConfigError(f"{path}: release.tag {rel['tag']!r} must start with the model, {train.get('model')!r}")
    train["output"] = str(out / path.stem / "run")
    return {"name": path.stem, "release": rel, "train": load_config(train), "file": path}


def read_releases(configs: Path, out: Path, names=None) -> list[dict]:
    files = sorted(configs.glob("*.yaml"))
    known = [f.stem for f in files]
    missing = [n for n in names or () if n not in known]
    if missing:
        raise SystemExit(f"release.py: no release file for {', '.join(missing)} in {configs}; "
                         f"known: {', '.join(known)}")
    return [read_release(f, out) for f in files if not names or f.stem in names]


def source_commit() -> str:
    """The commit the code was at, with ``+changes`` when the working tree differs from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "eqzoo", "scripts", "configs"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+changes" if dirty else "")


# -- build -------------------------------------------------------------------------------------------
def _train(rel: dict) -> dict:
    """Train, or resume, or nothing when finished; returns the run's results."""
    import eqzoo.train

    run = Path(rel["train"]["output"])
    if not (run / "results.json").is_file() or not (run / "hub" / "config.json").is_file():
        resume = (run / "checkpoints" / "latest.json").is_file()
        eqzoo.train.train(rel["train"], resume=resume, overwrite=not resume)  # killed before epoch 1: afresh
    return json.loads((run / "results.json").read_text())


def _card(rel: dict, results: dict, history: list[dict], commit: str, command: str) -> dict:
    from eqzoo.hub.card import run_card_data

    cfg, r = rel["train"], rel["release"]
    d, o, s = cfg["data"], cfg["optim"], cfg["schedule"]
    curve = ", ".join(f"{h['val_acc']:.4f}" for h in history if "val_acc" in h)
    hours = sum(h.get("time", 0.0) for h in history) / 3600
    training = (f"Source data: {r['dataset']} (`{d['name']}`, symmetry {d['symmetry']}, {d['image_size']}x"
                f"{d['image_size']} images, {d['train_size']} training / {d['val_size']} validation images). "
                f"Recipe ({r['recipe']}): {o['name']}, lr {o['lr']}, weight decay {o['weight_decay']}, batch "
                f"{d['batch_size']}, {s['epochs']} epochs ({s['warmup_epochs']} warm-up, cosine), λ learning rate x"
                f"{o['likelihood_lr_scale']}, regularisers {cfg['regularizer']}, seed {cfg['seed']}. The weights "
                f"are those of the best validation epoch ({results['best_epoch']}); training took {hours:.2f} h on "
                f"{cfg['device']} with {cfg['threads'] or 'default'} threads. "
                f"Validation accuracy per epoch: {curve}.")
    file = rel["file"].resolve()
    file = file.relative_to(ROOT) if file.is_relative_to(ROOT) else file
    description = (f"\nRelease checkpoint `{r['tag']}` of eqzoo, built with `{command}` at eqzoo commit "
                   f"`{commit}` from `{file}`. {r['description']} Where eqzoo's registry holds the tag "
                   f"(`timm.list_pretrained('pe_*')`), `timm.create_model('{r['tag']}', pretrained=True)` loads "
                   "these weights too, pinned to the commit they were published at and checked by their sha256.\n")
    card = run_card_data(cfg, results)  # the accuracies in the card's model-index, as eqzoo train files them
    card.update(model_name=r["tag"] or rel["name"], dataset_name=r["dataset"], training=training,
                description=description, tags=["eqzoo-release"])
    return card


def _stage(rel: dict, card: dict, stage: Path) -> None:
    """The Hub repo folder: the run's best weights, saved again with the release card."""
    import timm

    import eqzoo

    run_model = Path(rel["train"]["output"]) / "hub"
    if not eqzoo.hub.is_pe_architecture(rel["train"]["model"]):  # a baseline: its folder as the run wrote it
        tmp = stage.with_name(stage.name + ".new")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run_model, tmp)
        shutil.rmtree(stage, ignore_errors=True)
        tmp.rename(stage)
        return
    source = stage if (stage / "config.json").is_file() else run_model
    model = timm.create_model(f"local-dir:{source}", pretrained=True)
    eqzoo.save_pretrained(model, stage, card_data=card)


def build_one(rel: dict, out: Path) -> dict:
    import eqzoo
    import eqzoo.train

    folder = out / rel["name"]
    record_file = folder / "release.json"
    trained_at = None
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record["train"] != json.loads(json.dumps(rel["train"])):
            raise SystemExit(f"release.py: {rel['file']} has changed since {rel['name']} was built; delete "
                             f"{folder} to build it again with the new config")
        if all(record.get(key) == value for key, value in rel["release"].items()):
            print(f"{rel['name']}: built (delete {folder} to build it again)", flush=True)
            return record
        # only the release section changed (a card's text, the recipe's status): the same weights, a new card
        print(f"{rel['name']}: the release section changed: staging it again, without training", flush=True)
        trained_at = record["commit"]
    else:
        print(f"{rel['name']}: training into {rel['train']['output']}", flush=True)
    results = _train(rel)
    history = json.loads((Path(rel["train"]["output"]) / "metrics.json").read_text())
    commit, command = trained_at or source_commit(), f"python scripts/release.py build {rel['name']}"
    card = _card(rel, results, history, commit, command)
    stage = folder / "stage"
    _stage(rel, card, stage)
    t0 = time.time()
    check = eqzoo.train.evaluate(rel["train"], f"local-dir:{stage}", "test")
    pe = eqzoo.hub.is_pe_architecture(rel["train"]["model"])
    record = {
        "name": rel["name"], **rel["release"], "architecture": rel["train"]["model"], "train": rel["train"],
        "test_accuracy": results["test_acc"], "eval_test_accuracy": check["acc"], "eval_seconds": time.time() - t0,
        "val_accuracy": results.get("val_acc"), "best_epoch": results["best_epoch"],
        "val_curve": [h.get("val_acc") for h in history], "train_loss_curve": [h.get("train_loss") for h in history],
        "epoch_seconds": [h.get("time") for h in history], "wall_seconds": sum(h.get("time", 0.0) for h in history),
        "commit": commit, "command": command, "card": card if pe else None,
        "lambda": [{k: row[k] for k in ("layer", "group", "kl_uniform", "closest_subgroup")}
                   for row in eqzoo.degree_of_equivariance(eqzoo.load_likelihoods(stage))] if pe else [],
    }
    if abs(check["acc"] - results["test_acc"]) > 1e-6:
        print(f"{rel['name']}: warning: eqzoo eval of the staged folder gives {check['acc']:.4f}, the run "
              f"measured {results['test_acc']:.4f}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{rel['name']}: test accuracy {results['test_acc']:.4f} (eqzoo eval of the staged folder: "
          f"{check['acc']:.4f}), {record['wall_seconds'] / 60:.1f} min of training; staged in {stage}", flush=True)
    return record


def cmd_build(args) -> None:
    out = Path(args.out)
    for rel in read_releases(Path(args.configs), out, args.names):
        build_one(rel, out)


# -- speed -------------------------------------------------------------------------------------------
def cmd_speed(args) -> None:
    """Training throughput of each release's model, data and settings at several batch sizes, and
    the build time it implies: two short epochs of ``batch x --steps`` images each with eqzoo's own
    engine (the first one warms up, the second is timed), no validation or test."""
    import copy
    import math
    import tempfile

    import eqzoo.train

    out = Path(args.out)
    lines = ["| checkpoint | batch | images/s | hours for its epochs (training only) |", "|---|--:|--:|--:|"]
    for rel in read_releases(Path(args.configs), out, args.names):
        cfg = rel["train"]
        for batch in args.batches:
            n = batch * args.steps
            if cfg["data"]["name"] == "ddmnist":  # balanced over its 100 classes
                n = math.ceil(n / 100) * 100
            probe = copy.deepcopy(cfg)
            probe["data"].update(train_size=n, val_size=0, test_size=0, batch_size=batch)
            probe["schedule"].update(epochs=2, warmup_epochs=0)
            with tempfile.TemporaryDirectory(prefix="release-speed-") as tmp:
                probe.update(output=str(Path(tmp) / "run"), save_model=False, tensorboard=False)
                history = eqzoo.train.train(probe)["history"]
            rate = n / history[1]["time"]
            hours = cfg["schedule"]["epochs"] * cfg["data"]["train_size"] / rate / 3600
            lines.append(f"| {rel['name']} | {batch} | {rate:.0f} | {hours:.2f} |")
            print(lines[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


# -- report ------------------------------------------------------------------------------------------
def cmd_report(args) -> None:
    out = Path(args.out)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/release.json"))]
    lines = ["| checkpoint | tag | published | test acc | eqzoo eval | best epoch / epochs | training (min) | "
             "λ per layer (closest subgroup, KL to uniform) |", "|---|---|---|--:|--:|---|--:|---|"]
    for r in records:
        lam = ", ".join(f"{x['layer']} {x['closest_subgroup']} ({x['kl_uniform']:.2f})" for x in r["lambda"])
        lines.append(f"| {r['name']} | {r['tag'] or '-'} | {'yes' if r['publish'] else 'no (baseline)'} | "
                     f"{r['test_accuracy']:.4f} | {r['eval_test_accuracy']:.4f} | {r['best_epoch']} / "
                     f"{len(r['val_curve'])} | {r['wall_seconds'] / 60:.1f} | {lam or '-'} |")
    (out / "release.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    for r in records:
        ax.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], marker=".", label=r["name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


# -- publish -----------------------------------------------------------------------------------------
def registry_entry(stage: Path, record: dict, repo_id: str, revision: str) -> dict:
    """The registry entry of a published folder: what its config.json says, pinned to ``revision``."""
    from eqzoo._io import sha256
    from eqzoo.hub import read_config

    cfg = read_config(f"local-dir:{stage}")
    pc = cfg.get("pretrained_cfg", {})
    entry = {"hf_hub_id": repo_id, "revision": revision, "sha256": sha256(stage / "model.safetensors"),
             "model_args": cfg["model_args"], "num_classes": cfg["num_classes"], "input_size": list(pc["input_size"]),
             "dataset": record["dataset"], "test_accuracy": record["test_accuracy"]}
    for key in ("mean", "std"):
        if key in pc:
            entry[key] = list(pc[key])
    for key in ("interpolation", "crop_pct"):
        if key in pc:
            entry[key] = pc[key]
    return entry


def cmd_publish(args) -> None:
    if args.endpoint:  # huggingface_hub reads it when imported, so before eqzoo is
        os.environ["HF_ENDPOINT"] = args.endpoint.rstrip("/")
    import eqzoo.hub
    from eqzoo._io import sha256
    from eqzoo.models._pretrained import read_registry, registry_path, write_registry

    out = Path(args.out)
    registry = Path(args.registry) if args.registry else registry_path()
    tags = read_registry(registry) if registry.is_file() else {}
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/release.json"))]
    records = [r for r in records if r["publish"] and (not args.names or r["name"] in args.names)]
    if not records:
        raise SystemExit(f"release.py: nothing to publish in {out} (build first; only publish: true checkpoints go)")
    for r in records:
        stage, repo_id = out / r["name"] / "stage", f"{args.org}/{r['repo']}"
        done_file = out / r["name"] / "published.json"
        done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        weights = sha256(stage / "model.safetensors")
        if done.get("repo_id") == repo_id and done.get("sha256") == weights and r["tag"] in tags:
            print(f"{r['name']}: already published as {repo_id}@{done['revision']}", flush=True)
            continue
        _stage_for_repo(r, stage, repo_id)  # the card names the repo it is published in
        info = eqzoo.hub.publish(stage, repo_id, commit_message=f"eqzoo release {r['tag']} ({r['commit']})",
                                 overwrite_card=True)  # the card describes these weights, also on a re-publish
        tags[r["tag"]] = registry_entry(stage, r, repo_id, info.oid)
        done_file.write_text(json.dumps({"repo_id": repo_id, "revision": info.oid, "sha256": weights,
                                         "endpoint": os.environ.get("HF_ENDPOINT")}, indent=1) + "\n")
        write_registry(tags, registry)  # after each upload: a failure later keeps what was published
        print(f"{r['name']}: published as {repo_id}@{info.oid}; tag {r['tag']} written to {registry}", flush=True)


def _stage_for_repo(record: dict, stage: Path, repo_id: str) -> None:
    """Render the card again naming the repo (the weights, and so their sha256, stay the same)."""
    import timm

    import eqzoo

    model = timm.create_model(f"local-dir:{stage}", pretrained=True)
    eqzoo.save_pretrained(model, stage, card_data=record["card"], repo_id=repo_id)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train, evaluate and stage checkpoints (resumable)")
    b.add_argument("names", nargs="*", metavar="NAME", help="release files to build (default: all)")
    sp = sub.add_parser("speed", help="measure training throughput at several batch sizes (a few steps each)")
    sp.add_argument("names", nargs="*", metavar="NAME", help="release files to measure (default: all)")
    sp.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    sp.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    for q in (b, sp):
        q.add_argument("--configs", default=str(ROOT / "configs" / "release"), help="folder of NAME.yaml release files")
    r = sub.add_parser("report", help="table of the built checkpoints and their validation curves")
    pub = sub.add_parser("publish", help="upload the staged checkpoints and write their registry tags")
    pub.add_argument("names", nargs="*", metavar="NAME", help="checkpoints to publish (default: all built)")
    pub.add_argument("--org", required=True, help="Hub organisation (or user) the repos are created in")
    pub.add_argument("--endpoint", help="Hub URL (default: huggingface_hub's, i.e. $HF_ENDPOINT or the Hub)")
    pub.add_argument("--registry", help="registry file to write (default: $EQZOO_PUBLISHED, else the package's "
                                        "eqzoo/models/published.json)")
    for q in (b, sp, r, pub):
        q.add_argument("--out", default="runs/release", help="where runs, staged folders and records go")
    args = p.parse_args(argv)
    {"build": cmd_build, "speed": cmd_speed, "report": cmd_report, "publish": cmd_publish}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

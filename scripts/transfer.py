"""The fine-tuning benchmark: what a release checkpoint is worth on a downstream task with few labels.

    python scripts/transfer.py run [--releases runs/release] [--out runs/transfer] [--source staged|hub]
                                   [--tasks TASK ...] [--labels N ...] [--seeds S ...] [--models MODEL ...]
    python scripts/transfer.py report [--out runs/transfer]

Each release checkpoint (``scripts/release.py build``) is loaded as a user would load it:
``local-dir:`` of its staged folder (``--source staged``), or ``hf-hub:ORG/NAME@REVISION`` as
``release.py publish`` recorded it (``--source hub``; add ``--endpoint URL`` for another Hub),
and fine-tuned with ``eqzoo.train.finetune`` (what ``eqzoo finetune --from SOURCE`` runs) with a
new head. Against it, the same architecture (the checkpoint's config.json) trained from scratch
with ``eqzoo.train.train`` on the same labelled images (the data seed is the run's seed).

Tasks (data sets of :mod:`eqzoo.data.fewshot`, every image rotated by its own random angle):

- ``rotmnist``: from the upright-MNIST checkpoints (``*_mnist``) to MNIST digits rotated by any
  angle, 10 / 100 / 1,000 labels per class; tested on 2,000 of MNIST's test digits (a seeded draw),
  rotated (±0.7 points of standard error at 90 %, and a fifth of the evaluation time);
- ``digits``: from the rotated-MNIST checkpoints (``*_rotmnist``) to scikit-learn's 8x8 digits
  (other writers), upsampled to 33x33 and rotated, 10 / 50 labels per class; tested on the rest.

Models: ``cnn`` (resnet18), ``strict`` (strict D4) and ``learnt`` (learnt D4); modes ``scratch``,
``finetuned`` (λ keeps learning) and, for ``learnt``, ``frozen`` (fine-tuned with λ fixed: the
ablation that asks whether λ adapts to the downstream symmetry). No validation split: every run
trains for the same number of updates (``--steps``) and is tested with its final weights.

``run`` writes ``OUT/TASK/kLABELS/MODEL-MODE/seedS`` (a finished run is skipped, a killed one
resumes). ``report`` writes ``OUT/transfer.md``, test accuracy by task x labels x model x mode
(mean ± std over seeds), the benchmark's targets checked, and the λ read-out of the fine-tuned
learnt models next to their checkpoint's; and ``OUT/transfer.png``, accuracy against labels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TASKS = {
    "rotmnist": dict(sources={"cnn": "resnet18_mnist", "strict": "d4_strict_mnist", "learnt": "d4_mnist"},
                     data=dict(name="fewshot_mnist", symmetry="SO2", image_size=33, val_size=0, test_size=2000),
                     labels=(10, 100, 1000)),
    "digits": dict(sources={"cnn": "resnet18_rotmnist", "strict": "d4_strict_rotmnist", "learnt": "d4_rotmnist"},
                   data=dict(name="fewshot_digits", symmetry="SO2", image_size=33, val_size=0, test_size=None),
                   labels=(10, 50)),
}
MODELS = ("cnn", "strict", "learnt")
MODES = {"cnn": ("scratch", "finetuned"), "strict": ("scratch", "finetuned"),
         "learnt": ("scratch", "finetuned", "frozen")}
SEEDS = (0, 1, 2)
# The recipe, the same for every run: AdamW and a fixed number of updates, so that every cell of
# the table had about the same compute. At least 200 updates of 32 images, rounded up to whole epochs
# (201 at 10 labels per class, 210 at 50, 217 at 100, 312 at 1,000), fit 105 runs into about two hours of
# a 2-core CPU: 67 passes over 10 labels per class, one over 1,000 (the table says so).
RECIPE = dict(steps=200, batch_size=32, lr=1e-3, weight_decay=0.01, likelihood_lr_scale=10.0)


def source_of(releases: Path, name: str, kind: str) -> str:
    """How a user names checkpoint ``name``: ``local-dir:`` of its staged folder, or with ``hub``
    the ``hf-hub:`` repo at the commit ``release.py publish`` recorded (baselines are not published:
    always their folder)."""
    stage = releases / name / "stage"
    if not (stage / "config.json").is_file():
        raise SystemExit(f"transfer.py: {stage} holds no staged checkpoint: run scripts/release.py build {name}")
    if kind == "hub" and json.loads((releases / name / "release.json").read_text())["publish"]:
        published = releases / name / "published.json"
        if not published.is_file():
            raise SystemExit(f"transfer.py: {name} is not published yet: run scripts/release.py publish, or use "
                             "--source staged")
        p = json.loads(published.read_text())
        return f"hf-hub:{p['repo_id']}@{p['revision']}"
    return f"local-dir:{stage}"


def checkpoint_of(task: str, model: str, args) -> str:
    """The release checkpoint that ``model`` fine-tunes from on ``task``: the task's, or
    ``--checkpoints MODEL=NAME``'s (another release's, e.g. the demo's)."""
    chosen = dict(item.split("=", 1) for item in getattr(args, "checkpoints", None) or ())
    return chosen.get(model, TASKS[task]["sources"][model])


def architecture_of(configs: Path, name: str, releases: Path) -> tuple[str, dict]:
    """(model, model arguments) of release checkpoint ``name`` as its release file declares them
    (read and checked as ``release.py`` reads it): what a run from scratch builds, known before the
    checkpoint is."""
    from release import read_release  # scripts/release.py, beside this file

    path = configs / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"transfer.py: no release file {path}")
    train = read_release(path, releases)["train"]
    return train["model"], dict(train.get("model_args") or {})


def run_config(task: str, labels: int, model: str, mode: str, seed: int, args) -> tuple[dict, str | None]:
    """(run config, fine-tuning source or None for a run from scratch)."""
    name = checkpoint_of(task, model, args)
    source = None if mode == "scratch" else source_of(Path(args.releases), name, args.source)
    architecture, model_args = architecture_of(Path(args.configs), name, Path(args.releases))
    data = dict(TASKS[task]["data"], root=args.root, seed=seed, train_size=10 * labels, batch_size=RECIPE["batch_size"])
    if args.image_size:
        data["image_size"] = args.image_size
    if args.test_size:
        data["test_size"] = args.test_size
    per_epoch = max(1, 10 * labels // RECIPE["batch_size"])  # training drops the last partial batch
    epochs = max(1, math.ceil(args.steps / per_epoch))  # whole epochs: at least --steps updates
    cfg = dict(
        model=architecture if mode == "scratch" else source,
        model_args=model_args if mode == "scratch" else {},
        data=data, seed=seed, threads=args.threads, progress=False, freeze_likelihood=mode == "frozen",
        optim=dict(name="adamw", lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"],
                   likelihood_lr_scale=RECIPE["likelihood_lr_scale"]),
        schedule=dict(epochs=epochs, warmup_epochs=epochs / 10),
        save_model=model == "learnt",  # the report reads the fine-tuned λ
        output=str(Path(args.out) / task / f"k{labels}" / f"{model}-{mode}" / f"seed{seed}"),
    )
    return cfg, source


def all_runs(args):
    """Seed by seed, so that a run stopped part-way has every cell of the table for its first seeds."""
    for seed in args.seeds:
        for task in args.tasks:
            for labels in args.labels or TASKS[task]["labels"]:
                for model in args.models:
                    for mode in MODES[model]:
                        yield task, labels, model, mode, seed


def _run_one(job) -> str:
    cfg, source = job
    import eqzoo.train

    run = Path(cfg["output"])
    resume = (run / "checkpoints" / "latest.json").is_file()
    if source is None:
        eqzoo.train.train(cfg, resume=resume, overwrite=not resume)
    else:  # what `eqzoo finetune --config C --from SOURCE` runs
        eqzoo.train.finetune(cfg, source, resume=resume, overwrite=not resume)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # only for resuming: ~0.5 GB a run, 105 runs
    return str(run)


def cmd_run(args) -> None:
    if args.endpoint:  # huggingface_hub reads it when imported
        os.environ["HF_ENDPOINT"] = args.endpoint.rstrip("/")
    while True:
        todo = []
        for task, labels, model, mode, seed in all_runs(args):
            name = checkpoint_of(task, model, args)
            ready = mode == "scratch" or (Path(args.releases) / name / "stage" / "config.json").is_file()
            cfg, source = run_config(task, labels, model, mode, seed, args) if ready else ({}, name)
            if not ready or not (Path(cfg["output"]) / "results.json").is_file():
                todo.append((seed, ready, cfg, source))
        waiting = sorted({source for _, ready, _, source in todo if not ready})
        print(f"{len(todo)} runs to do" + (f", waiting for {', '.join(waiting)}" if waiting else ""), flush=True)
        if args.dry_run:
            for _, ready, cfg, source in todo:
                if ready:
                    print(cfg["output"], "<-", source or f"{cfg['model']} from scratch", flush=True)
            return
        runnable = [t for t in todo if t[1]]
        if not runnable:
            if not waiting:
                return
            if not args.wait:
                raise SystemExit(f"transfer.py: no staged checkpoint yet for {', '.join(waiting)}: run "
                                 "scripts/release.py build, or add --wait to run meanwhile")
            time.sleep(60)  # a build in another process stages them
            continue
        first = min(seed for seed, *_ in runnable)  # a seed's table before the next seed's
        jobs = [(cfg, source) for seed, _, cfg, source in runnable if seed == first]
        if args.workers == 1:
            for job in jobs:
                print("done", _run_one(job), flush=True)
        else:
            with ProcessPoolExecutor(args.workers) as pool:
                for done in pool.map(_run_one, jobs):
                    print("done", done, flush=True)


# -- the report --------------------------------------------------------------------------------------
def _mean_std(xs):
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _results(out: Path) -> dict:
    """{(task, labels, model, mode): [test accuracy per finished seed]}."""
    found = {}
    for res in sorted(out.glob("*/k*/*-*/seed*/results.json")):
        run = res.parent
        task, labels, (model, mode) = run.parents[2].name, int(run.parents[1].name[1:]), run.parent.name.split("-")
        found.setdefault((task, labels, model, mode), []).append(json.loads(res.read_text())["test_acc"])
    return found


def _targets(acc: dict, budgets) -> list[str]:
    """The benchmark's targets, each said to hold or not, from the mean accuracies."""
    lines = []
    for task, labels in budgets:
        m = lambda model, mode: acc.get((task, labels, model, mode))  # noqa: E731
        learnt, cnn, strict = m("learnt", "finetuned"), m("cnn", "finetuned"), m("strict", "finetuned")
        if learnt is not None and cnn is not None and strict is not None:
            best = max(cnn, strict)
            lines.append(f"- {task}, {labels}/class: fine-tuned learnt {100 * learnt:.1f} vs best of CNN/strict "
                         f"{100 * best:.1f}: {'holds' if learnt >= best - 0.01 else 'does not hold'} (≥ best − 1)")
            if labels == 10:
                lines.append(f"- {task}, 10/class: learnt − CNN = {100 * (learnt - cnn):+.1f} points: "
                             f"{'holds' if learnt - cnn >= 0.05 else 'does not hold'} (≥ +5)")
        if labels <= 100:
            for model in MODELS:
                ft, sc = m(model, "finetuned"), m(model, "scratch")
                if ft is not None and sc is not None:
                    lines.append(f"- {task}, {labels}/class, {model}: fine-tuned {100 * ft:.1f} vs scratch "
                                 f"{100 * sc:.1f}: {'holds' if ft > sc else 'does not hold'} (fine-tuned > scratch)")
    return lines


def _lambda_lines(out: Path, args) -> list[str]:
    import eqzoo

    def readout(folder: Path) -> str:
        rows = eqzoo.degree_of_equivariance(eqzoo.load_likelihoods(folder))
        return ", ".join(f"{r['layer']} {r['closest_subgroup']} ({r['kl_uniform']:.2f})" for r in rows)

    lines = []
    for task in TASKS:
        name = checkpoint_of(task, "learnt", args)
        source = Path(args.releases) / name / "stage"
        runs = sorted(out.glob(f"{task}/k*/learnt-finetuned/seed*/hub"))
        if not runs:
            continue
        if (source / "likelihoods.json").is_file():
            lines.append(f"- {task}, checkpoint `{name}`: {readout(source)}")
        for hub in runs:
            lines.append(f"- {task}, {hub.parents[2].name[1:]}/class, fine-tuned, {hub.parent.name}: {readout(hub)}")
    return lines


def cmd_report(args) -> None:
    out = Path(args.out)
    found = _results(out)
    budgets = sorted({(t, k) for t, k, _, _ in found}, key=lambda b: (list(TASKS).index(b[0]), b[1]))
    columns = [(model, mode) for model in MODELS for mode in MODES[model]]
    names = {"scratch": "scratch", "finetuned": "fine-tuned", "frozen": "fine-tuned, λ frozen"}
    lines = ["| task | labels/class | " + " | ".join(f"{model} {names[mode]}" for model, mode in columns) + " |",
             "|---|--:|" + "--:|" * len(columns)]
    for task, labels in budgets:
        cells = []
        for model, mode in columns:
            xs = found.get((task, labels, model, mode))
            cells.append(f"{100 * _mean_std(xs)[0]:.1f} ± {100 * _mean_std(xs)[1]:.1f} ({len(xs)})" if xs else "-")
        lines.append(f"| {task} | {labels} | " + " | ".join(cells) + " |")
    means = {key: _mean_std(xs)[0] for key, xs in found.items()}
    recipe = (f"AdamW, lr {RECIPE['lr']}, batch {RECIPE['batch_size']}, at least {RECIPE['steps']} updates (whole "
              "epochs) per run unless `--steps` said otherwise, final weights")
    text = [f"Test accuracy (%), mean ± std over seeds (number of seeds); `python scripts/transfer.py run` ({recipe}) "
            f"and `report`, runs in `{out}`.", "", *lines, "", "Targets:", "",
            *(_targets(means, budgets) or ["- (no complete budget yet)"]), "",
            "λ per layer (closest subgroup, KL to uniform) of the learnt checkpoints and of their fine-tunes:", "",
            *(_lambda_lines(out, args) or ["- (no fine-tuned learnt model yet)"])]
    (out / "transfer.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))
    if found:
        _plot(found, columns, names, out / "transfer.png")


def _plot(found: dict, columns, names, path: Path) -> None:
    """Test accuracy against labels per class, one panel per task, mean ± std over seeds."""
    from matplotlib.figure import Figure

    tasks = [t for t in TASKS if any(key[0] == t for key in found)]
    fig = Figure(figsize=(5 * len(tasks), 3.8))
    colours = {"cnn": "tab:gray", "strict": "tab:blue", "learnt": "tab:red"}
    styles = {"scratch": ":", "finetuned": "-", "frozen": "--"}
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for model, mode in columns:
            points = sorted((k, _mean_std(xs)) for (t, k, m, o), xs in found.items()
                            if (t, m, o) == (task, model, mode))
            if points:
                ax.errorbar([k for k, _ in points], [100 * ms[0] for _, ms in points],
                            yerr=[100 * ms[1] for _, ms in points], color=colours[model], linestyle=styles[mode],
                            marker=".", capsize=2, label=f"{model} {names[mode]}")
        ax.set_xscale("log")
        ax.set_xlabel("labels per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _checkpoint_arg(text: str) -> str:
    model, _, name = text.partition("=")
    if model not in MODELS or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL=NAME with MODEL one of {', '.join(MODELS)}")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="fine-tune and train from scratch (resumable)")
    r.add_argument("--source", choices=("staged", "hub"), default="staged",
                   help="load the checkpoints from their staged folders (local-dir:) or from the Hub (hf-hub:)")
    r.add_argument("--endpoint", help="Hub URL for --source hub (default: huggingface_hub's)")
    r.add_argument("--tasks", nargs="*", choices=list(TASKS), default=list(TASKS))
    r.add_argument("--labels", nargs="*", type=int, help="labels per class (default: each task's)")
    r.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    r.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS))
    r.add_argument("--steps", type=int, default=RECIPE["steps"],
                   help=f"updates per run (batch {RECIPE['batch_size']})")
    r.add_argument("--image-size", type=int, help="override the tasks' image size (the checkpoints' own)")
    r.add_argument("--test-size", type=int, help="test on the first N test images only")
    r.add_argument("--workers", type=int, default=1, help="runs in parallel (each with --threads)")
    r.add_argument("--dry-run", action="store_true", help="list the runs still to do, and stop")
    r.add_argument("--wait", action="store_true",
                   help="while checkpoints are still being built, run what can run and wait for the rest")
    r.add_argument("--threads", type=int, default=1, help="CPU threads per run (1: best on a busy machine)")
    r.add_argument("--root", default=os.environ.get("EQZOO_MNIST_ROOT", "data"), help="folder holding MNIST/")
    r.add_argument("--configs", default="configs/release", help="the release files (what a run from scratch builds)")
    rep = sub.add_parser("report", help="write OUT/transfer.md and OUT/transfer.png")
    for q in (r, rep):
        q.add_argument("--releases", default="runs/release", help="scripts/release.py's --out")
        q.add_argument("--out", default="runs/transfer")
        q.add_argument("--checkpoints", nargs="*", metavar="MODEL=NAME", type=_checkpoint_arg,
                       help="fine-tune MODEL (cnn, strict, learnt) from release checkpoint NAME instead of the task's")
    args = p.parse_args(argv)
    {"run": cmd_run, "report": cmd_report}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The symmetry panel: a plain CNN, the strict D4 model and the learnt-λ D4 model, trained side by
side on the same data and budget, on six data sets made from real MNIST, with several seeds.

    python scripts/panel.py run [--root data] [--out runs/panel] [--workers 2] [--only DATA ...] [--models MODEL ...]
    python scripts/panel.py report [--out runs/panel]
    python scripts/panel.py basis

``run`` trains every (data set, model, seed) with ``eqzoo train`` into ``OUT/DATA/MODEL/seedS``; a
run whose ``results.json`` exists is skipped and a killed one resumes from its last checkpoint, so
the panel continues across sessions. ``report`` writes ``OUT/panel.md`` (mean ± std test accuracy
at the best validation epoch, eval- vs train-mode accuracy, the learnt λ and the kernels' own
symmetry per layer) and the plots
``OUT/curves.png`` (validation accuracy per epoch) and ``OUT/DATA/lambda.png``. ``basis`` prints
the equivariance error of both kernel bases at rotations off the pixel grid.

Data sets (all from real MNIST, under ``--root``; the transforms are drawn once per image unless
said otherwise):

- ``upright``: MNIST as it is (the CNN's home: λ should leave the group);
- ``c4``: each digit rotated by a random multiple of 90 degrees;
- ``so2``: each digit rotated by a random angle;
- ``d1``: each digit mirrored left-right with probability 1/2;
- ``ddmnist``: our double-digit MNIST (left digit upright, right digit rotated by any angle);
- ``ddmnist_paper``: the paper's double-digit MNIST (both digits rotated by any angle, drawn afresh
  every epoch).

Models (ResNet-18 layout with one block per stage, widths 64-64-128-128, i.e. 8-8-16-16 regular
D4 fields): ``cnn`` = timm's ``resnet18`` at these widths (with ``zero_init_last=False``, the pe
models' default), ``strict`` = ``pe_resnet18`` with ``learn_likelihood=False`` (D4-invariant),
``learnt`` = ``pe_resnet18`` with its defaults (for D4 the complete basis). The ablations:
``learnt_antialiased`` (``basis="antialiased"``), and on the single-digit sets ``learnt_head``
(the invariant-at-init ``head="learnt"``, antialiased basis), ``learnt_o2`` (λ over O(2), 5 fields
of 14 channels per 64, Fourier ReLU), ``learnt_o2_norm`` / ``learnt_o2_gated`` (the same with
the norm and gated nonlinearities), ``strict_c4`` (strictly C4-invariant, 16 regular C4 fields per 64
channels: the fixed choice that matches the rotated sets), ``escnn_strict`` (the strict
network built from escnn's own modules, see :func:`register_escnn_baseline`) and
``strict_plain_head`` (the strict D4 backbone with the learnt model's plain head: what λ adds),
the measurements behind the defaults.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCH = dict(layers=[1, 1, 1, 1], stem_width=64, channels=[64, 64, 128, 128])
MNIST = dict(image_size=33, train_size=5000, val_size=1000, test_size=2000)
DDMNIST = dict(name="ddmnist", train_size=10000, val_size=2000, test_size=5000)
DATA = {
    "upright": dict(MNIST, name="mnist", symmetry="C1"),
    "c4": dict(MNIST, name="mnist", symmetry="C4"),
    "so2": dict(MNIST, name="mnist", symmetry="SO2"),
    "d1": dict(MNIST, name="mnist", symmetry="D1"),
    "ddmnist": dict(DDMNIST, symmetry=["C1", "SO2"]),
    "ddmnist_paper": dict(DDMNIST, symmetry=["SO2", "SO2"], resample=True),
}
EPOCHS = {"upright": 10, "c4": 10, "so2": 10, "d1": 10, "ddmnist": 8, "ddmnist_paper": 8}
MODELS = {
    "cnn": dict(model="resnet18", model_args=dict(ARCH, zero_init_last=False)),  # the pe models' default
    "strict": dict(model="pe_resnet18", model_args=dict(ARCH, group="D4", learn_likelihood=False)),
    "learnt": dict(model="pe_resnet18", model_args=dict(ARCH, group="D4")),
    "learnt_antialiased": dict(model="pe_resnet18", model_args=dict(ARCH, group="D4", basis="antialiased")),
    "learnt_head": dict(model="pe_resnet18", model_args=dict(ARCH, group="D4", head="learnt", basis="antialiased")),
    "learnt_o2": dict(model="pe_resnet18", model_args=dict(ARCH, group="O2")),
    "learnt_o2_norm": dict(model="pe_resnet18", model_args=dict(ARCH, group="O2", nonlinearity="norm")),
    "learnt_o2_gated": dict(model="pe_resnet18", model_args=dict(ARCH, group="O2", nonlinearity="gated")),
    "strict_c4": dict(model="pe_resnet18", model_args=dict(ARCH, group="C4", learn_likelihood=False)),
    "escnn_strict": dict(model="panel_escnn_resnet", model_args=dict(ARCH)),
    "strict_plain_head": dict(model="pe_resnet18", model_args=dict(ARCH, group="D4", learn_likelihood=False,
                                                                    head="plain")),
}
SEEDS = (0, 1, 2)
# the ablations run on the single-digit sets only (budget)
SINGLE = ("upright", "c4", "so2", "d1")
EXTRA = {"learnt_head": SINGLE, "learnt_o2": ("upright", "so2"), "learnt_o2_norm": ("upright", "so2"),
         "learnt_o2_gated": ("upright", "so2"), "strict_c4": ("c4", "so2"),
         "escnn_strict": ("upright", "c4", "so2")}


def register_escnn_baseline() -> None:
    """Register ``panel_escnn_resnet`` with timm: the strict D4 model's network (the same layout,
    widths and invariant head) built from escnn's own modules, R2Conv with escnn's kernel basis and
    initialisation, InnerBatchNorm, ReLU and PointwiseMaxPool, so that it trains with the same loop."""
    import timm
    import torch
    from escnn import gspaces
    from escnn import nn as enn
    from timm.models import build_model_with_cfg, register_model

    if "panel_escnn_resnet" in timm.list_models("panel_escnn_resnet"):
        return

    class Block(enn.EquivariantModule):
        def __init__(self, in_type, out_type, stride):
            super().__init__()
            self.in_type, self.out_type = in_type, out_type
            self.branch = enn.SequentialModule(
                enn.R2Conv(in_type, out_type, 3, stride=stride, padding=1, bias=False),
                enn.InnerBatchNorm(out_type), enn.ReLU(out_type),
                enn.R2Conv(out_type, out_type, 3, padding=1, bias=False), enn.InnerBatchNorm(out_type))
            self.shortcut = None
            if stride != 1 or in_type != out_type:
                self.shortcut = enn.SequentialModule(enn.R2Conv(in_type, out_type, 1, stride=stride, bias=False),
                                                     enn.InnerBatchNorm(out_type))
            self.act = enn.ReLU(out_type)

        def forward(self, x):
            skip = x if self.shortcut is None else self.shortcut(x)
            return self.act(self.branch(x) + skip)

        def evaluate_output_shape(self, input_shape):
            return self.branch.evaluate_output_shape(input_shape)

    class EscnnResNet(torch.nn.Module):
        def __init__(self, num_classes=10, in_chans=1, layers=(1, 1, 1, 1), stem_width=64,
                     channels=(64, 64, 128, 128)):
            super().__init__()
            gs = gspaces.flipRot2dOnR2(4)
            fields = lambda c: enn.FieldType(gs, [gs.regular_repr] * (c // 8))
            self.in_type = enn.FieldType(gs, [gs.trivial_repr] * in_chans)
            t = fields(stem_width)
            mods = [enn.R2Conv(self.in_type, t, 7, stride=2, padding=3, bias=False), enn.InnerBatchNorm(t),
                    enn.ReLU(t), enn.PointwiseMaxPool2D(t, 3, 2, 1)]
            for i, (c, n) in enumerate(zip(channels, layers)):
                for j in range(n):
                    mods.append(Block(t, fields(c), 2 if i > 0 and j == 0 else 1))
                    t = fields(c)
            self.body = enn.SequentialModule(*mods)
            self.num_classes, self.num_features = num_classes, len(t)
            # the strict model's invariant head: pooled fields averaged over their group components
            self.fc = torch.nn.Linear(len(t), num_classes)

        def forward(self, x):
            y = self.body(enn.GeometricTensor(x, self.in_type)).tensor
            y = y.mean((2, 3)).view(x.shape[0], self.num_features, 8).mean(2)
            return self.fc(y)

    @register_model
    def panel_escnn_resnet(pretrained=False, **kwargs):
        return build_model_with_cfg(EscnnResNet, "panel_escnn_resnet", pretrained, **kwargs)


def run_config(data: str, model: str, seed: int, root: str, out: Path) -> dict:
    cfg = copy.deepcopy(MODELS[model])
    cfg.update(
        data=dict(DATA[data], root=root, batch_size=64),
        optim=dict(name="adamw", lr=1e-3, weight_decay=0.01, likelihood_lr_scale=10.0),
        schedule=dict(epochs=EPOCHS[data], warmup_epochs=1),
        regularizer=dict(alignment=5.0, kl_chain=3.0, kl_uniform=3.0),
        seed=seed, threads=1, progress=False, output=str(out / data / model / f"seed{seed}"),
    )
    return cfg


def all_runs():
    for data in DATA:
        for seed in SEEDS:
            for model in MODELS:
                if model in EXTRA and data not in EXTRA[model]:
                    continue
                yield data, model, seed


def _train_one(cfg: dict) -> str:
    import eqzoo.train

    register_escnn_baseline()
    run = Path(cfg["output"])
    resume = (run / "checkpoints" / "latest.json").is_file()
    eqzoo.train.train(cfg, resume=resume, overwrite=not resume)  # killed before its first checkpoint: start over
    return str(run)


def cmd_run(args) -> None:
    out = Path(args.out)
    todo = [run_config(d, m, s, args.root, out) for d, m, s in all_runs()
            if (not args.only or d in args.only) and (not args.models or m in args.models)
            and not (out / d / m / f"seed{s}" / "results.json").is_file()]
    print(f"{len(todo)} runs to do", flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        for done in pool.map(_train_one, todo):
            print("done", done, flush=True)


# -- the report --------------------------------------------------------------------------------------

def _mean_std(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


@functools.lru_cache(maxsize=None)
def _saved_model(run: Path):
    """The model a finished run saved (its best-on-validation weights), loaded once per report."""
    import timm

    register_escnn_baseline()
    return timm.create_model(f"local-dir:{run / 'hub'}", pretrained=True)


@functools.lru_cache(maxsize=None)
def _test_set(data: str, root: str):
    """(images, labels) of a data set's test split: the same for every model and seed (the data
    seed is fixed), so built once per report."""
    import torch

    import eqzoo.config
    from eqzoo.data import build_datasets

    test = build_datasets(eqzoo.config.load_config(run_config(data, "cnn", 0, root, Path(".")))["data"]).test
    return (torch.stack([test[i][0] for i in range(len(test))]),
            torch.as_tensor([test[i][1] for i in range(len(test))]))


def _mode_gap(run: Path, data: str, root: str):
    """Test accuracy of the saved model in eval mode and in train mode (batch statistics). The
    batches are a fixed random order of the test set, as a shuffled loader's: some test sets are
    stored class by class (the DDMNIST ones), and a batch of a few classes has the wrong statistics."""
    import torch

    x, y = _test_set(data, root)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    accs = []
    for train_mode in (False, True):
        m = copy.deepcopy(_saved_model(run)).train(train_mode)
        with torch.no_grad():
            pred = torch.cat([m(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
        accs.append(float((pred == y).float().mean()))
    return accs


def cmd_report(args) -> None:
    import eqzoo

    out = Path(args.out)
    rows, lam_rows, curves = [], [], {}
    for data in DATA:
        for model in MODELS:
            runs = [out / data / model / f"seed{s}" for s in SEEDS]
            done = [r for r in runs if (r / "results.json").is_file()]
            if not done:
                continue
            res = [json.loads((r / "results.json").read_text()) for r in done]
            acc = _mean_std([r["test_acc"] for r in res])
            row = dict(data=data, model=model, seeds=len(done), test=f"{acc[0]:.3f} ± {acc[1]:.3f}",
                       per_seed=" / ".join(f"{r['test_acc']:.3f}" for r in res),
                       best_epoch=" / ".join(str(r["best_epoch"]) for r in res))
            if args.mode_gap == "all" or (args.mode_gap == "pe" and model != "cnn"):
                gaps = [_mode_gap(r, data, args.root) for r in done]
                row["eval_vs_train_mode"] = " / ".join(f"{e:.3f}|{t:.3f}" for e, t in gaps)
            rows.append(row)
            hist = [json.loads((r / "metrics.json").read_text()) for r in done]
            curves[(data, model)] = [[h["val_acc"] for h in hs] for hs in hist]
            if MODELS[model]["model_args"].get("head", "auto") == "auto" and model.startswith("learnt"):
                heads = [eqzoo.head_invariance(_saved_model(r)) for r in done if (r / "hub").is_dir()]
                if heads:
                    row["head"] = heads
            if model.startswith("learnt") and (done[0] / "hub").is_dir():
                lams = eqzoo.load_likelihoods(done[0] / "hub")
                table = eqzoo.degree_of_equivariance(lams)
                kernels = eqzoo.kernel_invariance(_saved_model(done[0])) if not model.startswith("learnt_o2") else {}
                lam_rows.append((data, model, done[0].name, table, kernels))
                if model == "learnt":
                    eqzoo.plot_likelihoods(lams, out / data / "lambda.png", title=f"learnt λ, {data}, {done[0].name}")
    lines = ["| data | model | seeds | test acc (mean ± std) | per seed | best epoch | eval/train-mode test acc |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['model']} | {r['seeds']} | {r['test']} | {r['per_seed']} | "
                     f"{r['best_epoch']} | {r.get('eval_vs_train_mode', '')} |")
    lines.append("")
    for r in rows:
        if r.get("head"):
            names = [h["closest_subgroup"] for h in r["head"]]
            mean = {k: sum(h["scores"][k] for h in r["head"]) / len(r["head"]) for k in r["head"][0]["scores"]}
            lines.append(f"head of `{r['model']}` on `{r['data']}`: closest subgroup {' / '.join(names)}; "
                         "invariance per element (mean over seeds): "
                         + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()))
            lines.append("")
    for data, model, seed, table, kernels in lam_rows:
        lines.append(f"λ of `{model}` on `{data}` ({seed}): " + ", ".join(
            f"{t['layer']} {t['closest_subgroup']} ({t['kl_uniform']:.2f})" for t in table))
        lines.append("")
        if kernels:  # the symmetry of the filters themselves, and the least-invariant element's score
            lines.append(f"kernels of `{model}` on `{data}` ({seed}): " + ", ".join(
                f"{name} {k['closest_subgroup']} ({min(k['scores'].values()):.2f})" for name, k in kernels.items()))
            lines.append("")
    (out / "panel.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    _plot_curves(curves, out / "curves.png")


def _plot_curves(curves: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    datas = list(dict.fromkeys(d for d, _ in curves))
    fig = Figure(figsize=(3.2 * len(datas), 2.8))
    for i, data in enumerate(datas):
        ax = fig.add_subplot(1, len(datas), i + 1)
        for (d, model), seeds in curves.items():
            if d != data:
                continue
            n = min(len(s) for s in seeds)
            mean = [sum(s[e] for s in seeds) / len(seeds) for e in range(n)]
            ax.plot(range(1, n + 1), mean, label=model)
        ax.set_title(data)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        if i == 0:
            ax.set_ylabel("val acc (mean over seeds)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_basis(args) -> None:
    """Equivariance error of a strict O(2) layer at rotations off the pixel grid (45 and 30
    degrees), for both kernel bases: a smooth random input inside a disk, rotated with escnn."""
    import escnn.nn as enn
    import torch

    from eqzoo.groups import get_group
    from eqzoo.nn import PEConv2d

    torch.manual_seed(0)
    G = get_group("O2")
    fin, fout = G.trivial_type(1), G.field_type(2)
    n = 41
    x = torch.nn.functional.avg_pool2d(torch.randn(4, 1, n, n, dtype=torch.float64), 5, 1, 2)
    yy, xx = torch.meshgrid(torch.arange(n) - n // 2, torch.arange(n) - n // 2, indexing="ij")
    disk = ((xx**2 + yy**2) < (n // 2 - 4) ** 2).double()  # rotations move nothing across the border
    x = x * disk
    print("| kernel | basis | error at 45° | error at 30° |\n|---|---|---|---|")
    for k in (3, 5, 7):
        for basis in ("antialiased", "complete"):
            conv = PEConv2d(fin, fout, k, padding=k // 2, basis=basis).double().eval()
            errs = []
            for deg in (45, 30):
                g = G.element(0, math.radians(deg))
                with torch.no_grad():
                    gy = enn.GeometricTensor(conv(x), fout).transform(g).tensor
                    moved = conv(enn.GeometricTensor(x, fin).transform(g).tensor)
                errs.append(float(((moved - gy) * disk).norm() / (gy * disk).norm()))
            print(f"| {k}x{k} | {basis} | {errs[0]:.3f} | {errs[1]:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--only", nargs="*", choices=list(DATA), help="these data sets only")
    r.add_argument("--models", nargs="*", choices=list(MODELS), help="these models only")
    sub.add_parser("basis", help="equivariance error of both kernel bases off the pixel grid")
    rep = sub.add_parser("report")
    rep.add_argument("--mode-gap", nargs="?", const="pe", default="pe", choices=["pe", "all", ""],
                     help="also measure eval- vs train-mode test accuracy (pe models, or all)")
    for q in (r, rep):
        q.add_argument("--root", default=os.environ.get("EQZOO_MNIST_ROOT", "data"))
        q.add_argument("--out", default="runs/panel")
    args = p.parse_args(argv)
    {"run": cmd_run, "report": cmd_report, "basis": cmd_basis}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

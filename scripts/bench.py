"""Side-by-side CPU benchmarks. Timings here are noisy: every figure is the median of interleaved
repeats, and only ratios measured in the same run are meaningful.

    python scripts/bench.py layers     # PEConv2d vs escnn R2Conv vs nn.Conv2d, build times
    python scripts/bench.py models     # pe_resnet18 / pe_wrn16_8 vs timm / plain, model build times
    python scripts/bench.py models --large   # the sizes people train at: 224x224, batch 16
    python scripts/bench.py synthesis  # where a pe model's training step goes, at 224x224, batch 16
    python scripts/bench.py compiled   # the training step eager and under torch.compile, at 224x224
    python scripts/bench.py device     # pe_resnet18 vs timm on a GPU: bf16, batch 128 at 224x224
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def interleaved(fns: dict, repeats: int = 15, warmup: int = 3) -> dict:
    """Median seconds per call of each function, calls interleaved so that load hits all alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(module, x):
    def f():
        module.train()
        module.zero_grad(set_to_none=True)
        out = module(x)
        (out.tensor if hasattr(out, "tensor") else out).sum().backward()
    return f


def eval_step(module, x):
    def f():
        module.eval()
        with torch.no_grad():
            module(x)
    return f


LAYER_SETTINGS = [("D4", None), ("D8", None), ("O2", 3)]


def bench_layers(batch: int = 16, size: int = 32, channels: int = 128) -> None:
    from escnn import nn as enn

    from eqzoo.groups import get_group
    from eqzoo.nn import PEConv2d

    print(f"# layers: 3x3 conv, ~{channels} channels in and out, batch {batch}, {size}x{size}, "
          f"CPU, {torch.get_num_threads()} threads; median ms of interleaved repeats")
    print("| group | channels | PEConv2d train | R2Conv train | Conv2d train | PE/Conv2d train "
          "| PEConv2d eval | R2Conv eval | Conv2d eval | PE/Conv2d eval |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec, L in LAYER_SETTINGS:
        G = get_group(spec)
        n = channels // G.field_size(L)
        fin, fout = G.field_type(n, L), G.field_type(n, L)
        pe = PEConv2d(fin, fout, 3, padding=1)
        r2 = enn.R2Conv(fin, fout, 3, padding=1)
        conv = torch.nn.Conv2d(fin.size, fout.size, 3, padding=1)
        x = torch.randn(batch, fin.size, size, size)
        gx = enn.GeometricTensor(x, fin)
        tr = interleaved({"pe": train_step(pe, x), "r2": train_step(r2, gx), "conv": train_step(conv, x)})
        ev = interleaved({"pe": eval_step(pe, x), "r2": eval_step(r2, gx), "conv": eval_step(conv, x)})
        ms = lambda t: f"{t * 1e3:.1f}"
        print(f"| {spec} | {fin.size} | {ms(tr['pe'])} | {ms(tr['r2'])} | {ms(tr['conv'])} | "
              f"{tr['pe'] / tr['conv']:.2f}x | {ms(ev['pe'])} | {ms(ev['r2'])} | {ms(ev['conv'])} | "
              f"{ev['pe'] / ev['conv']:.2f}x |")
    print()
    print("# build time of one 3x3 layer (fresh process each; cold = empty basis cache)")
    print("| group | channels | cold | cached on disk | cached in process |")
    print("|---|---|---|---|---|")
    for spec, L in LAYER_SETTINGS:
        cold, disk, warm = _build_times(spec, L, channels)
        print(f"| {spec} | {channels} | {cold * 1e3:.0f} ms | {disk * 1e3:.0f} ms | {warm * 1e3:.1f} ms |")


_BUILD = """
import time, torch, sys
from eqzoo.groups import get_group
from eqzoo.nn import PEConv2d
G = get_group(sys.argv[1]); L = None if sys.argv[2] == 'None' else int(sys.argv[2])
n = int(sys.argv[3]) // G.field_size(L)
fin, fout = G.field_type(n, L), G.field_type(n, L)  # escnn's own type construction is not timed
t = time.perf_counter(); PEConv2d(fin, fout, 3, padding=1); first = time.perf_counter() - t
t = time.perf_counter(); PEConv2d(fin, fout, 3, padding=1); again = time.perf_counter() - t
print(first, again)
"""


def _build_times(spec, L, channels):
    cache = tempfile.mkdtemp(prefix="eqzoo-bench-")
    env = dict(os.environ, EQZOO_CACHE=cache)
    try:
        run = lambda: subprocess.run([sys.executable, "-c", _BUILD, spec, str(L), str(channels)], env=env,
                                     check=True, capture_output=True, text=True).stdout.split()
        cold, warm = map(float, run())
        disk, _ = map(float, run())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return cold, disk, warm


# -- models ------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, how to make it): "pe" = timm.create_model(**kwargs), "export" = eqzoo.export of that,
# "timm" = timm's own model, "wrn" = eqzoo's plain WideResNet
MODEL_FAMILIES = {
    "resnet18": dict(size=64, rows=[
        ("pe_resnet18 D4", "pe", dict(model="pe_resnet18", group="D4")),
        ("pe_resnet18 D4 antialiased", "pe", dict(model="pe_resnet18", group="D4", basis="antialiased")),
        ("pe_resnet18 D8", "pe", dict(model="pe_resnet18", group="D8")),
        ("pe_resnet18 O2", "pe", dict(model="pe_resnet18", group="O2")),
        ("pe_resnet18 D4 strict", "pe", dict(model="pe_resnet18", group="D4", learn_likelihood=False)),
        ("pe_resnet18 D4 exported", "export", dict(model="pe_resnet18", group="D4")),
        ("timm resnet18", "timm", dict(model="resnet18")),
    ]),
    "wrn16_8": dict(size=32, rows=[
        ("pe_wrn16_8 D4", "pe", dict(model="pe_wrn16_8", group="D4")),
        ("pe_wrn16_8 D4 strict", "pe", dict(model="pe_wrn16_8", group="D4", learn_likelihood=False)),
        ("pe_wrn16_8 D4 exported", "export", dict(model="pe_wrn16_8", group="D4")),
        ("plain WRN-16-8", "wrn", dict(depth=16, widen_factor=8)),
    ]),
}

# the sizes people train at, on the CPU: pe_resnet18 and pe_resnet50 at 224x224 (batch 16)
LARGE_FAMILIES = {
    "resnet18": dict(size=224, rows=[
        ("pe_resnet18 D4", "pe", dict(model="pe_resnet18", group="D4")),
        ("pe_resnet18 D4 strict", "pe", dict(model="pe_resnet18", group="D4", learn_likelihood=False)),
        ("pe_resnet18 D8", "pe", dict(model="pe_resnet18", group="D8")),
        ("pe_resnet18 O2", "pe", dict(model="pe_resnet18", group="O2")),
        ("pe_resnet18 O2, norm-ReLU", "pe", dict(model="pe_resnet18", group="O2", nonlinearity="norm")),
        ("pe_resnet18 O2, gated", "pe", dict(model="pe_resnet18", group="O2", nonlinearity="gated")),
        ("pe_resnet18 SO2", "pe", dict(model="pe_resnet18", group="SO2")),
        ("timm resnet18", "timm", dict(model="resnet18")),
    ]),
    "resnet50": dict(size=224, rows=[
        ("pe_resnet50 D4", "pe", dict(model="pe_resnet50", group="D4")),
        ("pe_resnet50 O2", "pe", dict(model="pe_resnet50", group="O2")),
        ("timm resnet50", "timm", dict(model="resnet50")),
    ]),
}


def _make_model(kind: str, kwargs: dict, num_classes: int = 10):
    import timm

    import eqzoo
    from eqzoo.models import WideResNet

    kwargs = dict(kwargs)
    if kind == "wrn":
        return WideResNet(num_classes=num_classes, **kwargs)
    model = timm.create_model(kwargs.pop("model"), num_classes=num_classes, **kwargs)
    return eqzoo.export(model) if kind == "export" else model


_MEMORY = """
import json, sys, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/scripts')
from bench import _make_model, train_step
kind, kwargs, batch, size = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = _make_model(kind, kwargs)
x = torch.randn(batch, 3, size, size)
def status(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key + ':')) / 1024
import ctypes, gc
gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0)  # hand freed build memory back: RSS = live memory
base = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS: builds' peaks are not training's
step = train_step(model, x)
for _ in range(2):
    step()
print(status('VmHWM') - base, base)
"""


def _training_peak_mib(kind, kwargs, batch, size):
    """Peak RSS during two training steps minus the RSS before them (model and libraries loaded),
    in a fresh process each, so that one model's freed memory is not another's."""
    import json

    out = subprocess.run([sys.executable, "-c", _MEMORY, ROOT, kind, json.dumps(kwargs), str(batch), str(size)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0])


def bench_models(batch: int = 32, builds: bool = True, families: dict = MODEL_FAMILIES,
                 repeats: int | None = None) -> None:
    """Throughput and training memory of the pe models next to their plain counterparts."""
    if ROOT not in sys.path:  # run as a script, the repository root is not importable otherwise
        sys.path.insert(0, ROOT)
    print(f"# models: batch {batch}, CPU, {torch.get_num_threads()} threads; images/s from the median of "
          "interleaved repeats; train peak = peak RSS of 2 training steps minus RSS before them "
          "(fresh process per model)")
    for family, spec in families.items():
        size = spec["size"]
        torch.manual_seed(0)
        models = {label: _make_model(kind, kw) for label, kind, kw in spec["rows"]}
        x = torch.randn(batch, 3, size, size)
        n = repeats or (5 if family == "resnet18" else 3)
        tr = interleaved({k: train_step(m, x) for k, m in models.items()}, repeats=n, warmup=1)
        ev = interleaved({k: eval_step(m, x) for k, m in models.items()}, repeats=n * 2, warmup=2)
        mem = {label: _training_peak_mib(kind, kw, batch, size) for label, kind, kw in spec["rows"]}
        ref = spec["rows"][-1][0]
        print(f"\n## {family}, {size}x{size} (ratios vs {ref})")
        print("| model | params | train img/s | train ratio | eval img/s | eval ratio | train peak MiB | memory ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for label, m in models.items():
            params = sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6
            print(f"| {label} | {params:.1f}M | {batch / tr[label]:.0f} | {tr[ref] / tr[label]:.2f}x | "
                  f"{batch / ev[label]:.0f} | {ev[ref] / ev[label]:.2f}x | {mem[label]:.0f} | "
                  f"{mem[label] / mem[ref]:.2f}x |")
        del models
    if builds:
        print("\n# timm.create_model build time, D4 (fresh process each; cold = empty basis cache, "
              "disk = basis cache on disk, warm = second build in the same process)")
        print("| model | cold | disk | warm |")
        print("|---|---|---|---|")
        import timm

        import eqzoo  # noqa: F401  (registers the models)
        for name in timm.list_models("pe_*"):
            cold, disk, warm = _model_build_times(name)
            print(f"| {name} | {cold:.1f} s | {disk:.1f} s | {warm:.1f} s |")


_MODEL_BUILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
import timm, eqzoo
t = time.perf_counter(); timm.create_model(sys.argv[2]); first = time.perf_counter() - t
t = time.perf_counter(); timm.create_model(sys.argv[2]); again = time.perf_counter() - t
print(first, again)
"""


def _model_build_times(name):
    cache = tempfile.mkdtemp(prefix="eqzoo-bench-")
    env = dict(os.environ, EQZOO_CACHE=cache)
    try:
        run = lambda: subprocess.run([sys.executable, "-c", _MODEL_BUILD, ROOT, name], env=env, check=True,
                                     capture_output=True, text=True).stdout.split()
        cold, warm = map(float, run())
        disk, _ = map(float, run())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return cold, disk, warm


def bench_device(device: str = "cuda", batch: int = 128, size: int = 224, repeats: int = 10) -> None:
    """The resnet18 rows of ``models`` on an accelerator: bf16 autocast, channels_last, images/s of
    a training step (forward, backward, SGD step) and of eval, and the peak memory of training."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py device: no CUDA device here (use --device cpu for a smoke run)")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# models on {name}: batch {batch}, {size}x{size}, bf16 autocast, channels_last; images/s "
          "from the median of interleaved repeats (synchronised); peak = max memory allocated in "
          "2 training steps")
    print("| model | train img/s | train ratio | eval img/s | eval ratio | train peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    rows = MODEL_FAMILIES["resnet18"]["rows"]
    steps, evals, peak = {}, {}, {}
    for label, kind, kw in rows:
        torch.manual_seed(0)
        model = _make_model(kind, kw, num_classes=1000).to(dev).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model=model, opt=opt):
            model.train()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(x).float().logsumexp(1).mean()
            loss.backward()
            opt.step()
            sync()

        def evaluate(model=model):
            model.eval()
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
                model(x)
            sync()

        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        for _ in range(2):
            step()
        if dev.type == "cuda":
            peak[label] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        steps[label], evals[label] = step, evaluate
    tr = interleaved(steps, repeats=repeats, warmup=2)
    ev = interleaved(evals, repeats=repeats, warmup=2)
    ref = rows[-1][0]
    for label, _, _ in rows:
        memory = f"{peak[label]:.0f} | {peak[label] / peak[ref]:.2f}x" if dev.type == "cuda" else "n/a | n/a"
        print(f"| {label} | {batch / tr[label]:.0f} | {tr[ref] / tr[label]:.2f}x | {batch / ev[label]:.0f} | "
              f"{ev[ref] / ev[label]:.2f}x | {memory} |")


def _replaced(module, kind, make):
    """``module`` with every submodule of type ``kind`` replaced, in place, by ``make(submodule)``."""
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, make(child))
        else:
            _replaced(child, kind, make)
    return module


def _row_label(name: str, kwargs: dict) -> str:
    """A table row's model: its name and group, e.g. ``pe_resnet18 D4``."""
    return f"{name} {kwargs.get('group', '')}".strip()


SYNTHESIS_ROWS = [("pe_resnet18", "resnet18", dict(group="D4")), ("pe_resnet50", "resnet50", dict(group="D4")),
                  ("pe_resnet18", "resnet18", dict(group="O2"))]


def bench_synthesis(batch: int = 16, size: int = 224, repeats: int = 7, rows=SYNTHESIS_ROWS) -> None:
    """Where a pe model's training step goes: the model; the same model with each PEConv2d
    exported (an nn.Conv2d with its current filter: the same convolutions, no synthesis); the
    model with every eqzoo layer exported (per-channel batch norms too); timm's model,
    interleaved; and the synthesis alone (every layer's filter forward and backward)."""
    import timm

    import eqzoo
    from eqzoo.nn import PEConv2d

    print(f"# where a training step goes: batch {batch}, {size}x{size}, CPU, {torch.get_num_threads()} threads; "
          "median ms of interleaved repeats")
    print("| model | train step | fixed filters | fixed filters, per-channel BN | timm | synthesis alone |")
    print("|---|---|---|---|---|---|")
    x = torch.randn(batch, 3, size, size)
    for name, plain, kwargs in rows:
        torch.manual_seed(0)
        build = lambda: timm.create_model(name, num_classes=10, **kwargs)
        model = build()
        fixed = _replaced(build(), PEConv2d, lambda conv: conv.export())
        fixed_bn = eqzoo.export(build(), counterpart=False)
        models = dict(model=model, fixed=fixed, fixed_bn=fixed_bn, timm=timm.create_model(plain, num_classes=10))
        convs = [m for m in model.modules() if isinstance(m, PEConv2d)]
        probes = [torch.randn_like(c.filter_and_bias()[0]) for c in convs]

        def synthesis():
            model.zero_grad(set_to_none=True)
            torch.autograd.backward([c.filter_and_bias()[0] for c in convs], probes)
        fns = {k: train_step(m, x) for k, m in models.items()}
        fns["synthesis"] = synthesis
        t = interleaved(fns, repeats=repeats, warmup=2)
        label = _row_label(name, kwargs)
        print(f"| {label} | " + " | ".join(f"{t[k] * 1e3:.0f}" for k in fns) + " |")
        del models


COMPILED_ROWS = [("pe_resnet18", dict(group="D4")), ("pe_resnet18", dict(group="O2"))]


def bench_compiled(batch: int = 16, size: int = 224, repeats: int = 5, rows=COMPILED_ROWS,
                   backend: str = "inductor") -> None:
    """A training step (forward + backward) of each model eager and under ``torch.compile``, and
    of timm's resnet18 both ways, interleaved; ratios against timm compiled the same way. The
    first compiled step (the compilation) is timed once."""
    import timm

    import eqzoo  # noqa: F401

    print(f"# torch.compile: batch {batch}, {size}x{size}, CPU, {torch.get_num_threads()} threads, backend {backend}; "
          "median ms of interleaved repeats")
    print("| model | eager | compiled | eager vs timm eager | compiled vs timm compiled | first compiled step |")
    print("|---|---|---|---|---|---|")
    x = torch.randn(batch, 3, size, size)
    torch.manual_seed(0)
    models = {"timm resnet18": timm.create_model("resnet18", num_classes=10)}
    for name, kwargs in rows:
        models[_row_label(name, kwargs)] = timm.create_model(name, num_classes=10, **kwargs)
    fns, first = {}, {}
    for label, model in models.items():
        fns[(label, "eager")] = train_step(model, x)
        # (an OptimizedModule trains, zeroes and steps the parameters of the model it wraps)
        fns[(label, "compiled")] = step = train_step(torch.compile(model, backend=backend), x)
        t = time.perf_counter()
        step()
        first[label] = time.perf_counter() - t
    t = interleaved(fns, repeats=repeats, warmup=1)
    ref = "timm resnet18"
    for label in models:
        e, c = t[(label, "eager")], t[(label, "compiled")]
        print(f"| {label} | {e * 1e3:.0f} | {c * 1e3:.0f} | {t[(ref, 'eager')] / e:.2f}x | "
              f"{t[(ref, 'compiled')] / c:.2f}x | {first[label]:.0f} s |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["layers", "models", "synthesis", "compiled", "device"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-builds", action="store_true", help="models: skip the build-time table")
    p.add_argument("--large", action="store_true",
                   help="models: pe_resnet18 (D4, D8, O2, SO2) and pe_resnet50 (D4, O2) at 224x224, batch 16 "
                        "(default --batch 16 and no build table)")
    p.add_argument("--device", default="cuda", help="device: where to run (default cuda)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: models 32, --large 16, device 128)")
    p.add_argument("--size", type=int, default=224, help="device, synthesis, compiled: image size (default 224)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: models 5 or 3, device 10)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "layers":
        bench_layers()
    elif args.what == "models" and args.large:
        bench_models(args.batch or 16, builds=False, families=LARGE_FAMILIES, repeats=args.repeats)
    elif args.what == "models":
        bench_models(args.batch or 32, builds=not args.no_builds, repeats=args.repeats)
    elif args.what == "synthesis":
        bench_synthesis(args.batch or 16, args.size, repeats=args.repeats or 7)
    elif args.what == "compiled":
        bench_compiled(args.batch or 16, args.size, repeats=args.repeats or 5)
    else:
        bench_device(args.device, args.batch or 128, args.size, args.repeats or 10)


if __name__ == "__main__":
    main()

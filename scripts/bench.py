"""Side-by-side CPU benchmarks. Timings here are noisy: every figure is the median of interleaved
repeats, and only ratios measured in the same run are meaningful.

    python scripts/bench.py layers     # PEConv2d vs escnn R2Conv vs nn.Conv2d, build times
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["layers"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "layers":
        bench_layers()


if __name__ == "__main__":
    main()

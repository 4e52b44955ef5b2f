"""eqzoo's demo (``make demo``): does a learnt λ find the symmetry a data set really has?

scikit-learn's handwritten digits (shipped with scikit-learn, no download), each image rotated by
a random multiple of 90 degrees but never flipped. Three models with the same layout train on it:

- a plain CNN (timm's resnet18 at the widths below),
- the strict D4-steerable model (λ frozen at uniform: invariant to rotations *and* flips),
- the learnt-λ D4 model (starts as the strict one; every layer learns its own λ).

Then the learnt model is saved in the Hub format, reloaded through
``timm.create_model('local-dir:...')``, its λ is read out per layer, and the symmetry its plain
classifier learnt is read out with :func:`eqzoo.head_invariance`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"plain CNN (resnet18)": "digits_cnn.yaml",
           "strict D4 (uniform λ)": "digits_d4_strict.yaml",
           "learnt λ over D4": "digits_d4_learnt.yaml"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="where the runs go")
    p.add_argument("--epochs", type=int, default=None, help="override the configs' epochs")
    args = p.parse_args(argv)

    import timm

    import eqzoo
    from eqzoo.train import train

    torch.set_num_threads(1)  # small models: one thread is faster than two on a 2-core machine
    out = Path(args.out)
    results, start = {}, time.time()
    for label, config in CONFIGS.items():
        run_dir = out / Path(config).stem
        if run_dir.exists():  # the demo's own output: every `make demo` starts over
            print(f"replacing the previous demo run in {run_dir}")
            shutil.rmtree(run_dir)
        overrides = [f"output={run_dir}", "progress=false"]
        if args.epochs:
            overrides.append(f"schedule.epochs={args.epochs}")
        t = time.time()
        run = train(str(ROOT / "configs" / config), overrides=overrides)
        results[label] = (run, time.time() - t)

    print("\n## Test accuracy (scikit-learn digits, random 90-degree rotations, no flips)\n")
    print("| model | test accuracy | best epoch | train time |")
    print("|---|---|---|---|")
    for label, (run, seconds) in results.items():
        r = run["results"]
        print(f"| {label} | {r['test_acc']:.3f} | {r['best_epoch']} | {seconds:.0f} s |")

    learnt_dir = Path(results["learnt λ over D4"][0]["model_dir"])
    model = timm.create_model(f"local-dir:{learnt_dir}", pretrained=True).eval()
    print(f"\nreloaded with timm.create_model('local-dir:{learnt_dir}', pretrained=True): "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    rows = eqzoo.degree_of_equivariance(model)
    print("\n## Learnt degree of equivariance per layer\n")
    print(eqzoo.format_table(rows))

    rotations = reflections = 0.0
    for lam in eqzoo.likelihoods(model).values():
        d = lam.density(lam.group.elements()).detach()
        rotations += float(d[1:4].mean())  # the three non-trivial rotations
        reflections += float(d[4:].mean())
    n = len(eqzoo.likelihoods(model))
    print(f"\nmean λ over layers: non-trivial rotations {rotations / n:.3f}, reflections {reflections / n:.3f} "
          f"(uniform = 1)")
    if rotations > reflections:
        print("-> λ keeps more mass on the rotations than on the reflections, as the data "
              "(rotated, never flipped) suggests")
    else:
        print("-> on this run λ did not keep more mass on the rotations than on the reflections")

    kernels = eqzoo.kernel_invariance(model)
    print("\n## The symmetry each layer's filter kept (read off the filter itself)\n")
    print("| layer | closest subgroup | invariance to the rotations | to the reflections |")
    print("|---|---|---|---|")
    for name, k in kernels.items():
        sc = list(k["scores"].values())
        print(f"| {name} | {k['closest_subgroup']} | {min(sc[1:4]):.3f} | {min(sc[4:]):.3f} |")

    head = eqzoo.head_invariance(model)
    print("\n## What the plain head learnt\n")
    print("invariance of the classifier to each element (1 = the logits ignore it): "
          + ", ".join(f"{k} {v:.2f}" for k, v in head["scores"].items()))
    print(f"-> the head is invariant to {head['closest_subgroup']} (the data: rotated by multiples of 90 degrees, "
          "never flipped, i.e. C4)")

    plot = out / "likelihoods.png"
    eqzoo.plot_likelihoods(model, plot)
    print(f"\nplot of every layer's λ: {plot}")
    print(f"Hub-format model (config.json, model.safetensors, likelihoods.json/.png, card): {learnt_dir}")
    print(f"demo done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""eqzoo's demo (``make demo``): does a learnt λ find the symmetry a data set really has?

scikit-learn's handwritten digits (shipped with scikit-learn, no download), each image rotated by
a random multiple of 90 degrees but never flipped. Three models with the same layout train on it:

- a plain CNN (timm's resnet18 at the widths below),
- the strict D4-steerable model (λ frozen at uniform: invariant to rotations *and* flips),
- the learnt-λ D4 model (starts as the strict one; every layer learns its own λ).

Then the learnt model is saved in the Hub format, reloaded through
``timm.create_model('local-dir:...')``, its λ is read out per layer, and the symmetry its plain
classifier learnt is read out with :func:`eqzoo.head_invariance`.

Last, the release path at demo size, with the commands the full release uses: the release files
in ``configs/demo_release/`` are built (``scripts/release.py build``), published to a Hub look-alike
on 127.0.0.1 (``release.py publish``), their tag loaded in a fresh process with
``timm.create_model('pe_resnet18.d4_digits', pretrained=True)``, online and then with
``HF_HUB_OFFLINE=1`` from the cache, and fine-tuned on 10 labels per class of digits rotated by
any angle against the same models from scratch (``scripts/transfer.py``), which prints the table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
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
    release_demo(out / "release")
    print(f"demo done in {time.time() - start:.0f} s")
    return 0


LOAD_TAG = """
import sys, timm, eqzoo
tag = sys.argv[1]
model = timm.create_model(tag, pretrained=True)
print(f"timm.list_pretrained('pe_*'): {timm.list_pretrained('pe_*')}")
print(f"timm.create_model({tag!r}, pretrained=True): {sum(p.numel() for p in model.parameters()):,} parameters, "
      f"weights from {model.pretrained_cfg['hf_hub_id']} (repo@commit, sha256 checked)")
"""


def release_demo(out: Path) -> None:
    """Build, publish, load by tag and fine-tune the demo's release (see the module's docstring)."""
    from hub_server import LocalHub

    if out.exists():
        print(f"\nreplacing the previous demo release in {out}")
        shutil.rmtree(out)
    script = lambda name, *args: [sys.executable, str(ROOT / "scripts" / name), *map(str, args)]  # noqa: E731
    configs = ROOT / "configs" / "demo_release"
    t = time.time()
    print("\n## The release path at demo size\n")
    step(script("release.py", "build", "--configs", configs, "--out", out / "release"), "build", quiet=True)
    with LocalHub(out / "hub") as hub:
        # what a user's shell would hold: the Hub to talk to, a cache, a token, the registry to write and read
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(out / "hf-home"), HF_TOKEN="hf_demo")
        step(script("release.py", "publish", "--org", "eqzoo-demo", "--out", out / "release", "--registry",
                    out / "published.json"), "publish", env=env)
        env["EQZOO_PUBLISHED"] = str(out / "published.json")  # the registry publish wrote, instead of the package's
        load = [sys.executable, "-c", LOAD_TAG, "pe_resnet18.d4_digits"]
        step(load, "a fresh process loads the tag", env=env)
        step(load, "again with HF_HUB_OFFLINE=1: from the cache", env=dict(env, HF_HUB_OFFLINE="1"))
        step(script("transfer.py", "run", "--source", "hub", "--releases", out / "release", "--configs", configs,
                    "--out", out / "transfer", "--tasks", "digits", "--labels", 10, "--seeds", 0, "--steps", 60,
                    "--image-size", 16, "--checkpoints", "cnn=resnet18_digits", "strict=d4_strict_digits",
                    "learnt=d4_digits"), "fine-tune and train from scratch", env=env, quiet=True)
    print("Fine-tuned on 10 labels per class of digits rotated by any angle (the release was trained on 90-degree "
          "rotations of the same 1,797 digits: a demo of the path; the benchmark on MNIST is in "
          "scripts/README.md):\n")
    report = subprocess.run(script("transfer.py", "report", "--releases", out / "release", "--out",
                                   out / "transfer", "--checkpoints", "learnt=d4_digits"),
                            capture_output=True, text=True, check=True).stdout
    print(report.split("\nTargets:")[0].split("\n", 2)[2])
    print(f"release path in {time.time() - t:.0f} s; staged folders in {out / 'release'}")


def step(cmd: list[str], what: str, env: dict | None = None, quiet: bool = False) -> None:
    """Run one command as a user would, in its own process; show its last lines, or all of its error."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"demo: {what} failed ({' '.join(cmd[:3])} ...):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if not line.startswith(("epoch=", "results:"))]
    print(f"{what}:")
    for line in lines[-3:] if quiet else lines:
        print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())

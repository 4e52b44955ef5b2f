"""Run one of timm's scripts (``train.py``, ``validate.py``, ``inference.py``, ``benchmark.py``, ...)
with eqzoo's models registered::

    python -m eqzoo.timm_script path/to/timm/train.py --model pe_resnet18 --model-kwargs group=O2 ...
    torchrun --nproc_per_node=4 -m eqzoo.timm_script path/to/timm/train.py --model pe_resnet18 ...

timm has no plugin mechanism: a model is registered by importing its module, and timm's scripts
import only timm. This imports eqzoo first, then runs the script as ``__main__`` with the arguments
that follow it, as ``python path/to/timm/train.py ...`` would (the script's folder first on
``sys.path``). The scripts are in timm's git repository (not in its wheel or sdist).

With ``--sync-bn``, timm's ``train.py`` converts torch's batch norms only; eqzoo's field batch
norms are converted too (:func:`eqzoo.nn.convert_sync_batchnorm`) when a model first runs inside
a process group.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

USAGE = "usage: python -m eqzoo.timm_script SCRIPT [ARGS...]   (SCRIPT: one of timm's scripts, e.g. train.py)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        raise SystemExit(0 if argv else 2)
    script = Path(argv[0])
    if not script.is_file():
        raise SystemExit(f"eqzoo.timm_script: {script} is not a file; {USAGE}")

    import eqzoo  # noqa: F401  (registers the pe_* models with timm: the point of this runner)

    if "--sync-bn" in argv[1:]:
        _sync_field_norms_in_process_groups()

    sys.argv = [str(script), *argv[1:]]
    sys.path[0] = str(script.resolve().parent)  # as `python SCRIPT` sets it (here it is the cwd)
    runpy.run_path(str(script), run_name="__main__")


def _sync_field_norms_in_process_groups() -> None:
    """timm has no hook between building the model and training it, so a global forward pre-hook
    converts a model's field batch norms the first time its outermost module runs in a process
    group (before any of its layers run: the conversion changes no parameter or buffer)."""
    import weakref

    import torch
    import torch.distributed as dist

    from eqzoo.nn import FieldBatchNorm2d, SyncFieldBatchNorm2d

    seen = weakref.WeakSet()

    def convert(module, args):
        if module in seen or not (dist.is_available() and dist.is_initialized()):
            return
        for m in module.modules():
            seen.add(m)
            if type(m) is FieldBatchNorm2d:
                m.__class__ = SyncFieldBatchNorm2d  # as eqzoo.nn.convert_sync_batchnorm does

    torch.nn.modules.module.register_module_forward_pre_hook(convert)


if __name__ == "__main__":
    main()

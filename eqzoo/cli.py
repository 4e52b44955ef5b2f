"""The ``eqzoo`` command.

    eqzoo inspect MODEL [--out PNG] [--equivariance SIZE]
    eqzoo push RUN_DIR_OR_MODEL REPO_ID [--revision REV] [--private] [--message MSG]
    eqzoo publish REPO_ID RUN_DIR [--commit-message MSG] [--revision REV | --create-pr] [--private]
                  [--overwrite-card]
    eqzoo train --config configs/NAME.yaml [key=value ...] [--resume [RUN_DIR]] [--stop-after-epoch N]
    eqzoo finetune --config C.yaml --from MODEL [key=value ...]
    eqzoo eval RUN_DIR_OR_MODEL [--config C.yaml] [--split test] [--output FILE]

MODEL / RUN_DIR_OR_MODEL: ``hf-hub:ORG/NAME[@REV]``, ``local-dir:PATH``, a folder written by
``eqzoo.save_pretrained`` (or a run folder holding one in ``hub/``), or a timm model name.
Tokens come from the standard Hugging Face login (``hf auth login``) or ``HF_TOKEN``.

Subcommands live in :data:`SUBCOMMANDS` (name -> :class:`Subcommand`); add one with
:func:`register`. ``python -m eqzoo.train`` runs :func:`main_train` (``train`` by default).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import FAILURES, USAGE_ERRORS, CliError, ConfigError, TrainingError

# Only the standard library at import: the arguments are parsed (and `--help` answered) before
# torch, timm and escnn are imported, inside the subcommands that need them.


@dataclass
class Subcommand:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]  # adds the subcommand's arguments
    run: Callable[[argparse.Namespace], int | None]  # returns the exit status (None = 0)


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, help: str, configure, run) -> None:
    """Add (or replace) a subcommand of ``eqzoo``."""
    SUBCOMMANDS[name] = Subcommand(help, configure, run)


def _build(source: str, pretrained: bool = True):
    import timm

    from .sources import resolve_model

    spec = resolve_model(source)
    if ":" not in spec and not timm.is_model(spec):
        raise CliError(f"{source}: neither a run or model folder nor a timm model name (expected "
                       "hf-hub:ORG/NAME, local-dir:PATH, a folder written by eqzoo, or e.g. pe_resnet18)")
    return timm.create_model(spec, pretrained=pretrained and ":" in spec).eval()


# -- inspect -----------------------------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hf-hub:ORG/NAME[@REV], local-dir:PATH, a saved folder or a timm model name")
    p.add_argument("--out", help="write the plot of the learnt distributions here (PNG)")
    p.add_argument("--equivariance", type=_input_side, metavar="SIZE", default=None,
                   help=f"also build the model and measure its equivariance error on a random SIZExSIZE input, "
                        f"SIZE in [{MIN_SIDE}, {MAX_SIDE}] (odd sizes such as 33 or 65 keep strided feature maps "
                        "centred)")


# The equivariance measurement runs the model on every element of the group at once: its memory
# grows with SIZE squared.
MIN_SIDE, MAX_SIDE = 8, 512


def _input_side(text: str) -> int:
    try:
        side = int(text)
    except ValueError:
        side = None
    if side is None or not MIN_SIDE <= side <= MAX_SIDE:
        raise argparse.ArgumentTypeError(f"SIZE must be an integer in [{MIN_SIDE}, {MAX_SIDE}], got {text!r}")
    return side


def _inspect(args) -> int:
    import torch

    from .analysis import degree_of_equivariance, equivariance_error, format_table
    from .hub import load_likelihoods
    from .sources import resolve_model
    from .viz import plot_likelihoods

    spec = resolve_model(args.model)
    model = None
    if ":" in spec and args.equivariance is None:
        lams = load_likelihoods(spec)  # no need to build the model
    else:
        model = _build(args.model)
        lams = model
    print(format_table(degree_of_equivariance(lams)))
    if args.out:
        plot_likelihoods(lams, args.out, title=args.model)
        print(f"\nplot written to {args.out}")
    if args.equivariance is not None:
        model = model or _build(args.model)
        in_chans = getattr(model, "in_chans", 3)
        x = torch.randn(2, in_chans, args.equivariance, args.equivariance, generator=torch.Generator().manual_seed(0))
        rows = equivariance_error(model, x)
        print("\nrelative equivariance error (λ(g): the layer's likelihood at g)\n")
        print(format_table(rows, columns=["layer", "element", "likelihood", "error"], floatfmt=".2e"))
    return 0


# -- push / publish ----------------------------------------------------------------------------------
def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_DIR_OR_MODEL")
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("--revision", help="branch to push to (created if needed); default main")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default="Upload eqzoo model", help="commit message")


def _push(args) -> int:
    from .hub import push_to_hub

    model = _build(args.source)
    info = push_to_hub(model, args.repo_id, revision=args.revision, private=args.private, commit_message=args.message)
    print(f"pushed to {args.repo_id} (commit {getattr(info, 'oid', '?')}); load with "
          f"timm.create_model('hf-hub:{args.repo_id}', pretrained=True) after `import eqzoo`")
    return 0


def _publish_args(p: argparse.ArgumentParser) -> None:
    # the order and flags of `hf upload REPO_ID LOCAL_PATH`
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("source", metavar="RUN_DIR", help="a folder written by eqzoo.save_pretrained, or a run folder")
    p.add_argument("--commit-message", default="Add model", help="commit message")
    p.add_argument("--revision", help="branch to upload to (created if needed); default main")
    p.add_argument("--create-pr", action="store_true", help="open a pull request against main instead of committing")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--overwrite-card", action="store_true",
                   help="replace the README.md already on the Hub (kept by default)")


def _publish(args) -> int:
    from .hub import publish
    from .sources import model_folder

    folder = model_folder(args.source)
    if folder is None:
        raise CliError(f"{args.source} has no config.json (nor hub/config.json): save it with eqzoo.save_pretrained")
    info = publish(folder, args.repo_id, args.commit_message, revision=args.revision, private=args.private,
                   create_pr=args.create_pr, overwrite_card=args.overwrite_card)
    where = f"pull request {info.pr_url}" if getattr(info, "pr_url", None) else f"commit {getattr(info, 'oid', '?')}"
    print(f"published {folder} to {args.repo_id} ({where})")
    return 0


# -- train / finetune / eval --------------------------------------------------------------------------
def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted keys and YAML values: optim.lr=1e-3 data.symmetry=[C1,SO2]")


def _train_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue a stopped or killed run from its last checkpoint (the config's output, or RUN_DIR)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output folder that holds a run (deleting that run's files)")
    p.add_argument("--stop-after-epoch", type=_positive, default=None, metavar="N",
                   help="stop (resumably) once N epochs are done")


def _positive(text: str) -> int:
    if not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _finetune_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    p.add_argument("--from", dest="source", metavar="SOURCE",
                   help="pretrained model: hf-hub:org/name, local-dir:PATH, a run/model directory or arch.tag "
                        "(default: the config's model); the config's model and model_args are then not used")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="run directory, model directory, hf-hub:org/name, local-dir:PATH or arch.tag")
    _common_args(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--output", "-o", help="also write the metrics to this JSON file")


def _resolve(args) -> dict:
    """Config from --config, or from RUN_DIR/config.yaml when resuming a directory."""
    from .config import load_config, read_yaml

    source = args.config
    resume_dir = args.resume if isinstance(getattr(args, "resume", None), str) else None
    if resume_dir:
        saved = Path(resume_dir) / "config.yaml"
        if source is None:
            if not saved.is_file():
                raise TrainingError(f"cannot resume {resume_dir}: {saved} is missing")
            source = read_yaml(saved)
        return load_config(source, list(args.overrides) + [f"output={resume_dir}"])
    if source is None:
        raise ConfigError("--config is required (or --resume RUN_DIR)")
    if args.command == "finetune":
        from .train.api import finetune_config  # (resolves the source model: timm)

        return finetune_config(source, args.source, args.overrides)
    return load_config(source, list(args.overrides))


def _train(args: argparse.Namespace) -> int:
    """``eqzoo train`` and ``eqzoo finetune`` (which has ``--from``)."""
    cfg = _resolve(args)  # every key checked before the engine is imported
    from .train.run import run_training

    run_training(cfg, bool(args.resume), args.stop_after_epoch, args.overwrite)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ._io import write_json
    from .config import load_config, parse_overrides, read_yaml
    from .sources import resolve_model
    from .train.api import config_model, evaluate

    resolve_model(args.source)  # a mistyped path is named as such, before the config is looked for
    run_cfg = Path(args.source) / "config.yaml"
    source = args.config if args.config else (read_yaml(run_cfg) if run_cfg.is_file() else {})
    overrides = parse_overrides(args.overrides)
    if not config_model(source):  # the model evaluated is SOURCE
        overrides.setdefault("model", args.source)
    out = evaluate(load_config(source, overrides), args.source, args.split)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out, indent=1))
        if args.output:
            write_json(Path(args.output), out)
    return 0


register("inspect", "print the learnt degree of equivariance per layer (and plot it)", _inspect_args, _inspect)
register("push", "save a model in the Hub layout (card, likelihoods, plot) and upload it", _push_args, _push)
register("publish", "upload a folder written by eqzoo.save_pretrained, with its card", _publish_args, _publish)
register("train", "train a model from a YAML config (eqzoo train --config configs/NAME.yaml [KEY=VALUE ...])",
         _train_args, _train)
register("finetune", "fine-tune a pretrained model on a new data set with a new head", _finetune_args, _train)
register("eval", "evaluate a trained model (run directory, model folder, hf-hub:, local-dir:) on a data split",
         _eval_args, _eval)


# -- running a command --------------------------------------------------------------------------------
def add_debug_flag(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the full traceback of an error (by default: one line)")


def _exit_code(e: BaseException) -> int | None:
    """2 for mistakes in what was asked (config, arguments, paths), 1 for other known failures
    (damaged checkpoints, failed uploads), None for the unexpected."""
    if isinstance(e, USAGE_ERRORS):
        return 2
    if isinstance(e, FAILURES):
        return 1
    return None


def guarded(prog: str, fn, debug: bool = False) -> int:
    """Run ``fn``; an error prints one line (``--debug``: the traceback) and gives the exit status,
    Ctrl-C exits with 130 (the run has printed how to resume)."""
    try:
        return fn() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        code = _exit_code(e)
        if code is None:  # not one of eqzoo's errors: name its type, offer the traceback
            message = f"unexpected {type(e).__name__}: {e}" + ("" if debug else " (rerun with --debug for the traceback)")
        else:
            message = str(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqzoo", description="Learnt partial equivariance for timm models.")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        add_debug_flag(p, default=argparse.SUPPRESS)  # also after the subcommand: eqzoo train --debug ...
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with ``KEY=VALUE`` overrides accepted anywhere after the subcommand (argparse
    stops collecting a positional list at the first option) and never taken for ``--resume``'s folder."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides)
        resume = getattr(args, "resume", None)
        if isinstance(resume, str) and "=" in resume and not Path(resume).is_dir():
            args.overrides.append(resume)  # `--resume key=value`: resume the config's output, with the override
            args.resume = True
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        args.overrides += overrides
        rest = [a for a in rest if a not in overrides]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(f"eqzoo {args.command}", lambda: SUBCOMMANDS[args.command].run(args), args.debug)


def main_train(argv: list[str] | None = None) -> int:
    """``python -m eqzoo.train [train|finetune|eval] ...``: ``train`` when no subcommand is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "finetune", "eval"):
        argv = ["train", *argv]
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())

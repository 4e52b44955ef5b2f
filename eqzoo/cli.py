"""The ``eqzoo`` command.

    eqzoo inspect MODEL [--out PNG] [--equivariance SIZE]
    eqzoo push RUN_DIR_OR_MODEL REPO_ID [--revision REV] [--private] [--message MSG]
    eqzoo publish RUN_DIR REPO_ID [--revision REV] [--private] [--message MSG]
    eqzoo train --config configs/NAME.yaml [key=value ...] | --resume RUN_DIR
    eqzoo finetune --config C.yaml --from MODEL [key=value ...]
    eqzoo eval RUN_DIR_OR_MODEL [--config C.yaml] [--split test]

MODEL / RUN_DIR_OR_MODEL: ``hf-hub:ORG/NAME[@REV]``, ``local-dir:PATH``, a folder written by
``eqzoo.save_pretrained`` (or a run folder holding one in ``hub/``), or a timm model name.
Tokens come from the standard Hugging Face login (``hf auth login``) or ``HF_TOKEN``.

Subcommands live in :data:`SUBCOMMANDS` (name -> :class:`Subcommand`); add one with
:func:`register` (e.g. train, finetune, eval).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Subcommand:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]  # adds the subcommand's arguments
    run: Callable[[argparse.Namespace], int | None]  # returns the exit status (None = 0)


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, help: str, configure, run) -> None:
    """Add (or replace) a subcommand of ``eqzoo``."""
    SUBCOMMANDS[name] = Subcommand(help, configure, run)


def _hub_folder(path: str) -> Path | None:
    """The Hub-format folder of a run/saved folder (config.json in it or in its hub/), else None."""
    p = Path(path)
    for candidate in (p, p / "hub"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


class CliError(Exception):
    """A usage mistake (a path that does not exist, a name that is no model): one line, exit 2."""


def _model_spec(source: str) -> str:
    from .train import _looks_like_path

    if source.startswith("local-dir:") and not Path(source[len("local-dir:"):]).is_dir():
        raise CliError(f"{source}: no such folder")
    if source.startswith(("hf-hub:", "local-dir:")):
        return source
    folder = _hub_folder(source)
    if folder is not None:
        return f"local-dir:{folder}"
    if Path(source).exists():
        raise CliError(f"{source} has no config.json (nor hub/config.json): save it with eqzoo.save_pretrained")
    if _looks_like_path(source):
        raise CliError(f"{source}: no such run or model folder")
    return source  # a timm model name


def _build(source: str, pretrained: bool = True):
    import timm

    import eqzoo  # noqa: F401  (registers the pe_* models)

    spec = _model_spec(source)
    if ":" not in spec and not timm.is_model(spec):
        raise CliError(f"{source}: neither a run or model folder nor a timm model name (expected "
                       "hf-hub:ORG/NAME, local-dir:PATH, a folder written by eqzoo, or e.g. pe_resnet18)")
    return timm.create_model(spec, pretrained=pretrained and ":" in spec).eval()


# -- inspect -----------------------------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hf-hub:ORG/NAME[@REV], local-dir:PATH, a saved folder or a timm model name")
    p.add_argument("--out", help="write the plot of the learnt distributions here (PNG)")
    p.add_argument("--equivariance", type=int, metavar="SIZE", default=None,
                   help="also build the model and measure its equivariance error on a random SIZExSIZE input "
                        "(odd sizes such as 33 or 65 keep strided feature maps centred)")


def _inspect(args) -> int:
    from .analysis import degree_of_equivariance, equivariance_error, format_table
    from .hub import load_likelihoods

    spec = _model_spec(args.model)
    model = None
    if ":" in spec and args.equivariance is None:
        lams = load_likelihoods(spec)  # no need to build the model
    else:
        model = _build(args.model)
        lams = model
    print(format_table(degree_of_equivariance(lams)))
    if args.out:
        from .viz import plot_likelihoods

        plot_likelihoods(lams, args.out, title=args.model)
        print(f"\nplot written to {args.out}")
    if args.equivariance:
        import torch

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


def _publish(args) -> int:
    from .hub import publish

    folder = _hub_folder(args.source)
    if folder is None:
        raise CliError(f"{args.source} has no config.json (nor hub/config.json): save it with eqzoo.save_pretrained")
    info = publish(folder, args.repo_id, revision=args.revision, private=args.private, commit_message=args.message)
    print(f"published {folder} to {args.repo_id} (commit {getattr(info, 'oid', '?')})")
    return 0


register("inspect", "print the learnt degree of equivariance per layer (and plot it)", _inspect_args, _inspect)
register("push", "save a model in the Hub layout (card, likelihoods, plot) and upload it", _push_args, _push)
register("publish", "upload a folder written by eqzoo.save_pretrained, with its card", _push_args, _publish)


def _register_training() -> None:
    from . import train

    for name, (help_, configure, run) in train.SUBCOMMANDS.items():
        register(name, help_, configure, run)


_register_training()


def add_debug_flag(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the full traceback of an error (by default: one line)")


def _exit_code(e: BaseException) -> int | None:
    """2 for mistakes in what was asked (config, arguments, paths), 1 for other known failures
    (damaged checkpoints, failed uploads), None for the unexpected."""
    from .config import ConfigError
    from .hub import CheckpointError, HubConfigError, PushError
    from .train import TrainingError
    from .validate import ModelArgError

    if isinstance(e, (CliError, ConfigError, HubConfigError, ModelArgError, TrainingError, FileNotFoundError,
                      FileExistsError)):
        return 2
    if isinstance(e, (CheckpointError, PushError)):
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(f"eqzoo {args.command}", lambda: SUBCOMMANDS[args.command].run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""The README's table of registered models, computed from the models as built by default.

    python scripts/model_table.py            # print the table
    python scripts/model_table.py --write    # replace the table in README.md with it

Params count every parameter of ``timm.create_model(NAME)`` (λ included); GMACs are those of one
image at the model's default input size through its plain counterpart (``model.plain_counterpart()``,
what ``eqzoo.export`` returns), which is what an eval-mode pe model computes per image once its
filters are cached. The models are built on the meta device: no memory, no initialisation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MODELS = ("pe_resnet18", "pe_resnet34", "pe_resnet50", "pe_resnet101", "pe_wide_resnet50_2",
          "pe_wide_resnet101_2", "pe_wrn16_8", "pe_wrn28_10")
HEADER = "| model | counterpart (params) | params | GMACs |\n|---|---|---|---|\n"


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def model_row(name: str) -> str:
    import timm
    import torch

    import eqzoo  # noqa: F401  (registers the pe_* models)
    from eqzoo.hub.card import model_stats  # the model cards' count

    with torch.device("meta"):
        model = timm.create_model(name)
        plain = model.plain_counterpart()
    size = model.pretrained_cfg["input_size"]
    architecture = getattr(plain, "pretrained_cfg", {}).get("architecture")
    if architecture:  # a timm model
        label = f"`{architecture}`"
    else:  # eqzoo's plain WideResNet
        label = f"eqzoo `{type(plain).__name__}({model.model_args['depth']}, {model.model_args['widen_factor']})`"
    params = sum(p.numel() for p in model.parameters())
    plain_params = sum(p.numel() for p in plain.parameters())
    gmacs = model_stats(plain, size)["gmacs"]
    return f"| {name} | {label} ({millions(plain_params)}) | {millions(params)} | {gmacs:.2f} @ {size[-1]} px |"


def table() -> str:
    return HEADER + "\n".join(model_row(name) for name in MODELS) + "\n"


def readme_rows(text: str) -> list[str]:
    """The model table's rows as they stand in ``text`` (the lines under its header)."""
    rows = []
    for line in text[text.index(HEADER) + len(HEADER):].splitlines():
        if not line.startswith("| pe_"):
            break
        rows.append(line)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = p.parse_args(argv)
    new = table()
    if not args.write:
        print(new, end="")
        return 0
    text = README.read_text()
    start = text.index(HEADER)
    end = start + len(HEADER) + sum(len(r) + 1 for r in readme_rows(text))
    README.write_text(text[:start] + new + text[end:])
    print(f"wrote the model table into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

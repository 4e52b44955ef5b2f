r"""Plots of the learnt likelihoods λ over G, one small panel per (distinct) likelihood.

Each panel shows λ(s, θ) against the rotation angle θ: one curve for the rotations (s = 0) and,
where G has reflections, one for the reflections (s = 1, "reflect, then rotate by θ"). λ is a density
w.r.t. the normalised Haar measure, so the dashed line λ ≡ 1 is full equivariance; a peak at
θ = 0 on the rotation curve only is no equivariance; a curve flat on a subgroup K is
K-equivariance.
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from .likelihood import likelihood_records

ROT_COLOR, FLIP_COLOR = "#1f77b4", "#d62728"


def _records(obj) -> dict:
    """Normalise a model / {name: GroupLikelihood} / parsed likelihoods.json to its records
    (see :meth:`~eqzoo.GroupLikelihood.to_record`)."""
    if isinstance(obj, dict) and "likelihoods" in obj and isinstance(obj["likelihoods"], dict):
        return obj["likelihoods"]
    if isinstance(obj, (nn.Module, dict)):
        return likelihood_records(obj)
    raise TypeError(f"expected a model, a dict of GroupLikelihoods or a likelihoods.json record, got {type(obj).__name__}")


def _short(name: str, layers: list[str]) -> str:
    if not layers:
        return name
    return layers[0] if len(layers) == 1 else f"{layers[0]} (+{len(layers) - 1} layers)"


def plot_likelihoods(model_or_likelihoods, path: str | os.PathLike | None = None, ncols: int | None = None,
                     title: str | None = None):
    """Small multiples of the learnt distributions; returns a matplotlib ``Figure`` (Agg canvas, no
    pyplot state) and writes it to ``path`` (PNG, ...) when given.

    ``model_or_likelihoods``: a model, ``{name: GroupLikelihood}`` (e.g. :func:`eqzoo.load_likelihoods`)
    or a parsed likelihoods.json."""
    entries = _records(model_or_likelihoods)
    n = max(len(entries), 1)
    ncols = max(1, min(ncols or (4 if n <= 12 else 6), n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3.1 * ncols, 2.4 * nrows + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(entries):]:
        ax.set_visible(False)
    if not entries:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no learnt likelihoods", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (name, e) in zip(axes, entries.items()):
        flip = np.asarray(e["grid"]["flip"])
        theta = np.degrees(np.asarray(e["grid"]["theta"]))
        lam = np.asarray(e["grid"]["density"])
        finite = not e["group"] in ("O2", "SO2")
        for s, color, label in ((0, ROT_COLOR, "rotations"), (1, FLIP_COLOR, "reflections")):
            sel = flip == s
            if not sel.any():
                continue
            x, y = theta[sel], lam[sel]
            order = np.argsort(x)
            x, y = np.append(x[order], 360.0), np.append(y[order], y[order][0])  # periodic: close the curve
            ax.plot(x, y, "o-" if finite else "-", color=color, label=label, lw=1.4, ms=3.5)
        ax.axhline(1.0, color="0.45", ls="--", lw=1, label="uniform (equivariant)")
        ax.set_xlim(0, 360)
        ax.set_xticks([0, 90, 180, 270, 360])
        ax.set_ylim(0, max(1.5, float(lam.max()) * 1.1))
        ax.set_title(_short(name, e.get("layers", [])), fontsize=8.5)
        summ = e.get("summary", {})
        ax.text(0.98, 0.95, f"{e['group']}  KL={summ.get('kl_uniform', float('nan')):.2f}\n"
                            f"≈{summ.get('closest_subgroup', '?')}",
                ha="right", va="top", fontsize=7.5, transform=ax.transAxes)
        ax.tick_params(labelsize=7)
    if entries:
        axes[0].set_xlabel("rotation angle θ (degrees)", fontsize=8)
        axes[0].set_ylabel("λ (uniform = 1)", fontsize=8)
        axes[0].legend(fontsize=6.5, loc="upper left", frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig

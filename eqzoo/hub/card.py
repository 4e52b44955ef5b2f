"""The model card (README.md of a saved model), rendered from the template MODEL_CARD.md.

The template ships inside the package (package data, ``eqzoo/MODEL_CARD.md``), so that an
installed eqzoo renders the same card as a checkout; the repository's top-level MODEL_CARD.md is
a link to it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ..analysis import degree_of_equivariance, format_table
from ..models._schema import EXPORT_DIR, PLOT_NAME

__all__ = ["CARD_TEMPLATE", "CARD_DATA_KEYS", "render_model_card", "run_card_data"]

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"
# what card_data may say about a model's training
CARD_DATA_KEYS = {"license", "datasets", "dataset_name", "training", "results", "split", "description", "tags",
                  "model_name", "base_model", "task"}


def _results_table(results: dict) -> str:
    if not results:
        return ""
    lines = ["| metric | value |", "|---|--:|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    return "\n".join(lines)


def render_model_card(model: nn.Module, cfg: dict, card_data: dict | None = None, repo_id: str | None = None,
                      has_plot: bool = True, template_path: str | os.PathLike | None = None):
    """The model card (a huggingface_hub ``ModelCard``) rendered from MODEL_CARD.md: front matter
    (library_name timm, tags with eqzoo and the group, license, datasets, model-index results), usage,
    the plot, the per-layer degree-of-equivariance table, training data, results and versions."""
    info = dict(card_data or {})
    unknown = set(info) - CARD_DATA_KEYS
    if unknown:
        raise ValueError(f"card_data has unknown keys {sorted(unknown)}; known: {sorted(CARD_DATA_KEYS)}")
    arch = cfg["architecture"]
    args = cfg.get("model_args", {})
    rows = degree_of_equivariance(model)
    groups = sorted({r["group"] for r in rows}) or ([args["group"]] if "group" in args else [])
    repo_id = repo_id or f"ORG/{arch}"
    model_name = info.get("model_name") or repo_id.split("/")[-1]
    datasets = info.get("datasets") or []
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    results = dict(info.get("results") or {})
    dataset_name = info.get("dataset_name") or (datasets[0] if datasets else None)
    task = info.get("task", "image-classification")
    evals = [EvalResult(task_type=task, dataset_type=datasets[0] if datasets else dataset_name,
                        dataset_name=dataset_name, dataset_split=info.get("split"), metric_type=k, metric_value=v)
             for k, v in results.items() if isinstance(v, (int, float))] if dataset_name else []
    tags = ["image-classification", "timm", "eqzoo", "equivariance", "partial-equivariance", "steerable-cnn"]
    tags += [g.lower() for g in groups] + list(info.get("tags") or [])
    data = ModelCardData(library_name="timm", license=info.get("license", "apache-2.0"),
                         tags=list(dict.fromkeys(tags)), datasets=datasets or None,
                         metrics=list(results) or None, eval_results=evals or None,
                         model_name=model_name if evals else None, base_model=info.get("base_model"),
                         pipeline_tag=task)
    template = Path(template_path) if template_path else CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found"
                                + ("" if template_path else ": this eqzoo install lacks its package data "
                                   "(eqzoo/MODEL_CARD.md); reinstall eqzoo"))
    n_params = sum(p.numel() for p in model.parameters())
    meta = cfg["eqzoo"]
    kwargs = dict(
        model_name=model_name, repo_id=repo_id, architecture=arch, group=", ".join(groups) or "?",
        model_args=json.dumps(args, sort_keys=True), num_params=f"{n_params / 1e6:.2f}",
        num_classes=cfg.get("num_classes"), input_size=cfg.get("pretrained_cfg", {}).get("input_size"),
        description=info.get("description", ""), has_plot=has_plot, plot_file=PLOT_NAME,
        likelihood_table=format_table(rows), n_likelihoods=len(rows), training=info.get("training", ""),
        dataset_name=dataset_name, datasets=datasets, results_table=_results_table(results),
        exported_architecture=(meta.get("exported") or {}).get("architecture"), export_dir=EXPORT_DIR,
        versions=meta["versions"], basis_fingerprint=meta["basis_fingerprint"],
    )
    return ModelCard.from_template(data, template_path=str(template), **kwargs)


def run_card_data(cfg: dict, results: dict | None = None) -> dict:
    """What the card says about a model trained by ``eqzoo train`` with the resolved run config
    ``cfg``: the data set, the training settings and the run's accuracies."""
    d = cfg["data"]
    card = {"dataset_name": d["name"], "split": "test",
            "training": f"eqzoo train: {cfg['optim']['name']} lr {cfg['optim']['lr']}, "
                        f"{cfg['schedule']['epochs']} epochs, batch {d['batch_size']}, regularisers "
                        f"{cfg['regularizer']}, data {d['name']} (symmetry {d['symmetry']})"}
    if results:
        card["results"] = {k: v for k, v in results.items() if k in ("test_acc", "val_acc")}
    return card

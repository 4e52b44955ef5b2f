"""The model card (README.md of a saved model), rendered from the template MODEL_CARD.md.

The template ships inside the package (package data, ``eqzoo/MODEL_CARD.md``), so that an
installed eqzoo renders the same card as a checkout; the repository's top-level MODEL_CARD.md is
a link to it.

The front matter says ``library_name: eqzoo`` and never ``timm``: the Hub shows a library's
"use this model" snippet, and timm's calls ``timm.create_model`` without ``import eqzoo``, which
fails for pe models. The card's own usage section holds code that runs as copied.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.models import get_pretrained_cfg
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..analysis import degree_of_equivariance, format_table
from ..models._schema import EXPORT_DIR, PLOT_NAME

__all__ = ["CARD_TEMPLATE", "CARD_DATA_KEYS", "TIMM_CARD_KEYS", "PAPER", "render_model_card", "run_card_data",
           "card_data_from_timm", "check_card_data", "model_stats"]

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"
# what card_data may say about a model and its training
CARD_DATA_KEYS = {"license", "license_name", "license_link", "datasets", "dataset_name", "training", "results",
                  "description", "tags", "model_name", "base_model", "details", "citation"}
# the keys of timm's push_to_hf_hub(model_card=...) that eqzoo's card renders
TIMM_CARD_KEYS = {"description", "details", "license", "license_name", "license_link", "tags", "citation"}
SPLITS = ("train", "validation", "test")
# results: {split: {metric: value}}; the Hub's metric type and the name each is shown with
METRICS = {"accuracy": ("accuracy", None, "Top-1 accuracy"), "top5_accuracy": ("accuracy", "top5", "Top-5 accuracy")}
# tags that name another library: the Hub would offer that library's snippet, which lacks `import eqzoo`
_OTHER_LIBRARIES = {"timm", "transformers"}
PAPER = ("Veefkind & Cesa, \"A Probabilistic Approach to Learning the Degree of Equivariance in Steerable CNNs\", "
         "ICML 2024", "https://arxiv.org/abs/2406.03946")


class _Activations(TorchDispatchMode):
    """Counts the output elements of convolutions and matrix products (timm's "activations")."""

    OPS = {torch.ops.aten.convolution, torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
           torch.ops.aten.baddbmm}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.OPS:
            self.count += out.numel()
        return out


def model_stats(model: nn.Module, input_size) -> dict:
    """timm's model stats: parameters (M), GMACs and activations (M) of one image of
    ``input_size`` (C, H, W) in eval mode, counted on a second forward (the first builds the
    filters, which inference keeps)."""
    p = next(model.parameters())
    x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
            with FlopCounterMode(display=False) as flops, _Activations() as acts:
                model(x)
    finally:
        model.train(was_training)
    return {"params": sum(q.numel() for q in model.parameters()) / 1e6, "gmacs": flops.get_total_flops() / 2e9,
            "activations": acts.count / 1e6}


def card_data_from_timm(model_card: dict | None) -> dict:
    """card_data from timm's ``model_card`` dict (``push_to_hf_hub(model_card=...)``): its
    description, details, license, tags and citations; ``details['Dataset']`` names the data set."""
    model_card = dict(model_card or {})
    unknown = set(model_card) - TIMM_CARD_KEYS
    if unknown:
        raise ValueError(f"model_card has keys {sorted(unknown)} that eqzoo's card does not use; it uses "
                         f"{sorted(TIMM_CARD_KEYS)} (library_name is always eqzoo)")
    details = dict(model_card.get("details") or {})
    if "Dataset" in details and "dataset_name" not in model_card:
        model_card["dataset_name"] = str(details["Dataset"])
    return model_card


def check_card_data(card_data: dict | None) -> dict:
    """``card_data`` with known keys and well-formed results; raises ValueError otherwise."""
    info = dict(card_data or {})
    unknown = set(info) - CARD_DATA_KEYS
    if unknown:
        raise ValueError(f"card_data has unknown keys {sorted(unknown)}; known: {sorted(CARD_DATA_KEYS)}")
    _check_results(info.get("results") or {})
    return info


def _check_results(results) -> dict:
    if not isinstance(results, dict) or not all(
            split in SPLITS and isinstance(metrics, dict) and set(metrics) <= set(METRICS)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
            for split, metrics in results.items()):
        raise ValueError(f"card_data['results'] must be {{split: {{metric: number}}}} with splits {list(SPLITS)} "
                         f"and metrics {list(METRICS)}, got {str(results)[:100]}")
    return results


def _eval_results(results: dict, task: str, dataset_type: str, dataset_name: str) -> list[EvalResult]:
    return [EvalResult(task_type=task, dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split,
                       metric_type=METRICS[metric][0], metric_config=METRICS[metric][1],
                       metric_name=METRICS[metric][2], metric_value=value)
            for split, metrics in results.items() for metric, value in metrics.items()]


def _size(size) -> str:
    return f"{size[-2]} x {size[-1]}" if size else "?"


def render_model_card(model: nn.Module, cfg: dict, card_data: dict | None = None, repo_id: str | None = None,
                      has_plot: bool = True, template_path: str | os.PathLike | None = None):
    """The model card (a huggingface_hub ``ModelCard``) rendered from MODEL_CARD.md: front matter
    (library_name eqzoo, tags with the group, license, datasets, base_model, model-index
    accuracies), model details and stats, usage (classification, feature maps, embeddings, the
    learnt distributions), the plot, the per-layer degree-of-equivariance table, training data,
    results, versions and citation."""
    info = check_card_data(card_data)
    arch, args, pcfg = cfg["architecture"], cfg.get("model_args", {}), cfg.get("pretrained_cfg", {})
    rows = degree_of_equivariance(model)
    groups = sorted({r["group"] for r in rows}) or ([args["group"]] if "group" in args else [])
    repo_id = repo_id or f"ORG/{arch}"
    model_name = info.get("model_name") or repo_id.split("/")[-1]
    datasets = info.get("datasets") or []
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    results = info.get("results") or {}
    dataset_name = info.get("dataset_name") or (datasets[0] if datasets else None)
    num_classes = cfg.get("num_classes") or 0
    task = "image-classification" if num_classes else "image-feature-extraction"
    evals = _eval_results(results, task, datasets[0] if datasets else dataset_name, dataset_name) \
        if dataset_name else []
    tags = ["eqzoo", task, "equivariance", "partial-equivariance", "steerable-cnn"]
    tags += [g.lower() for g in groups] + [t for t in info.get("tags") or [] if t not in _OTHER_LIBRARIES]
    data = ModelCardData(library_name="eqzoo", license=info.get("license", "apache-2.0"),
                         license_name=info.get("license_name"), license_link=info.get("license_link"),
                         tags=list(dict.fromkeys(tags)), datasets=datasets or None,
                         metrics=["accuracy"] if evals else None, eval_results=evals or None,
                         model_name=model_name if evals else None, base_model=info.get("base_model"),
                         pipeline_tag=task)
    template = Path(template_path) if template_path else CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found"
                                + ("" if template_path else ": this eqzoo install lacks its package data "
                                   "(eqzoo/MODEL_CARD.md); reinstall eqzoo"))
    input_size = list(pcfg.get("input_size") or (3, 224, 224))
    image_size = f"train = {_size(input_size)}"
    if pcfg.get("test_input_size"):
        image_size += f", test = {_size(pcfg['test_input_size'])}"
    citations = info.get("citation") or []
    meta = cfg["eqzoo"]
    kwargs = dict(
        model_name=model_name, repo_id=repo_id, architecture=arch, group=", ".join(groups) or "?",
        model_args=json.dumps(args, sort_keys=True), stats=model_stats(model, input_size), image_size=image_size,
        num_classes=num_classes, has_labels=bool(cfg.get("label_names") or pcfg.get("label_names")), top_k=min(5, num_classes),
        image_mode="L" if input_size[0] == 1 else "RGB", image_hw=input_size[-2:],
        description=info.get("description", ""), details=dict(info.get("details") or {}),
        base_model=info.get("base_model"), has_plot=has_plot, plot_file=PLOT_NAME,
        likelihood_table=format_table(rows), n_likelihoods=len(rows), training=info.get("training", ""),
        dataset_name=dataset_name, results=results, metric_names={k: v[2] for k, v in METRICS.items()},
        exported_architecture=(meta.get("exported") or {}).get("architecture"), export_dir=EXPORT_DIR,
        versions=meta["versions"], basis_fingerprint=meta["basis_fingerprint"], paper=PAPER,
        citations=[citations] if isinstance(citations, str) else list(citations),
    )
    return ModelCard.from_template(data, template_path=str(template), **kwargs)


def run_card_data(cfg: dict, results: dict | None = None) -> dict:
    """What the card says about a model trained by ``eqzoo train`` with the resolved run config
    ``cfg``: the data set, the training settings, the run's accuracies (validation accuracy
    under the validation split, test accuracy under test) and, for a fine-tune of a Hub model,
    that model as ``base_model``."""
    d = cfg["data"]
    card = {"dataset_name": d["name"],
            "training": f"eqzoo train: {cfg['optim']['name']} lr {cfg['optim']['lr']}, "
                        f"{cfg['schedule']['epochs']} epochs, batch {d['batch_size']}, regularisers "
                        f"{cfg['regularizer']}, data {d['name']} (symmetry {d['symmetry']})"}
    source = str(cfg.get("model") or "")
    if source.startswith("hf-hub:"):
        card["base_model"] = source[len("hf-hub:"):].split("@")[0]
    elif "." in source and cfg.get("pretrained"):  # a registry tag: its weights come from the Hub
        hub_id = getattr(get_pretrained_cfg(source), "hf_hub_id", None)
        if hub_id:
            card["base_model"] = hub_id.split("@")[0]
    split_of = {"test_acc": ("test", "accuracy"), "val_acc": ("validation", "accuracy"),
                "test_top5": ("test", "top5_accuracy"), "val_top5": ("validation", "top5_accuracy")}
    scores: dict = {}
    for key, value in (results or {}).items():
        if key in split_of and isinstance(value, (int, float)) and not isinstance(value, bool):
            split, metric = split_of[key]
            scores.setdefault(split, {})[metric] = value
    if scores:
        card["results"] = scores
    return card

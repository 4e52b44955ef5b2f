"""Hugging Face Hub: save, publish and read eqzoo models with their learnt group distributions.

Loading goes through timm (``import eqzoo`` first; see :mod:`eqzoo.models._builder`)::

    timm.create_model("hf-hub:org/name", pretrained=True)          # or "hf-hub:org/name@revision"
    timm.create_model("local-dir:/path/to/folder", pretrained=True)
    timm.create_model("pe_resnet18.tag", pretrained=True)           # registry cfg with hf_hub_id

This package writes what those read: :func:`save_pretrained` (the folder layout is in
:mod:`eqzoo.hub.save`), :func:`push_to_hub` and :func:`publish` (:mod:`eqzoo.hub.push`), the model
card (:mod:`eqzoo.hub.card`), and reads a saved model's files without building it
(:mod:`eqzoo.hub.files`, :mod:`eqzoo.hub.likelihoods`).
"""
from .._io import check_safetensors
from ..errors import CheckpointError, HubConfigError, PushError
from ..models._schema import (CARD_NAME, CONFIG_NAME, EXPORT_DIR, HUB_FORMAT, LIKELIHOODS_NAME, PLOT_NAME,
                              WEIGHTS_NAME, basis_fingerprint, is_pe_architecture, structure_fingerprint,
                              validate_model_args, validate_saved_config, versions)
from ..sources import parse_source
from .card import CARD_TEMPLATE, render_model_card
from .files import check_saved_folder, model_args_from_hub, read_config
from .likelihoods import likelihood_record, load_likelihoods
from .push import IGNORE_PATTERNS, publish, push_to_hub, upload_folder
from .save import hub_config, model_args_of, save_pretrained

__all__ = ["save_pretrained", "push_to_hub", "publish", "upload_folder", "load_likelihoods", "likelihood_record",
           "read_config", "model_args_from_hub", "check_saved_folder", "hub_config", "model_args_of",
           "render_model_card", "CARD_TEMPLATE", "check_safetensors", "parse_source", "basis_fingerprint",
           "structure_fingerprint", "is_pe_architecture", "validate_model_args", "validate_saved_config", "versions",
           "HubConfigError", "CheckpointError", "PushError", "CONFIG_NAME", "WEIGHTS_NAME", "LIKELIHOODS_NAME",
           "PLOT_NAME", "CARD_NAME", "EXPORT_DIR", "HUB_FORMAT", "IGNORE_PATTERNS"]

"""Publishing to the Hugging Face Hub: upload a saved folder, or save a model and upload it.

:func:`push_to_hub` takes timm's ``push_to_hf_hub`` arguments in timm's order, and like timm it
keeps a model card already on the Hub (edited there, say) unless asked to replace it. Errors of
the upload are translated in one place (:func:`upload_folder`): whatever went wrong is a
:class:`~eqzoo.errors.PushError` that never carries the token, and the local files stay.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import timm
from huggingface_hub import HfApi, get_token
from torch import nn

from .._version import __version__
from ..errors import PushError
from ..models._schema import CARD_NAME, EXPORT_DIR
from .files import check_saved_folder
from .save import save_pretrained

__all__ = ["IGNORE_PATTERNS", "upload_folder", "push_to_hub", "publish"]

# Never uploaded by eqzoo and never loaded: pickle-based checkpoints and editor/temp files.
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.tmp", ".*"]
DEFAULT_MESSAGE = "Add model"  # timm's


def _redact(text: str, token: str | None) -> str:
    for secret in {token, get_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def upload_folder(directory: str | os.PathLike, repo_id: str, commit_message: str = DEFAULT_MESSAGE,
                  token: str | None = None, revision: str | None = None, private: bool = False,
                  create_pr: bool = False, overwrite_card: bool = False):
    """Upload a saved folder (as written by :func:`save_pretrained`) to ``repo_id``; returns the
    CommitInfo (with ``pr_url`` when ``create_pr``). Creates the repo (and the ``revision`` branch)
    if needed. A README.md already on the Hub is kept unless ``overwrite_card``. Pickles are never
    uploaded; files of a stale ``exported/`` are deleted. Token: ``token`` or the standard HF login."""
    directory = Path(directory)
    where = f"{repo_id}{'@' + revision if revision else ''}"
    if create_pr and revision not in (None, "main"):
        raise PushError(f"create_pr opens a pull request against main: leave revision ({revision!r}) out")
    api = HfApi(token=token, library_name="eqzoo", library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ignore = list(IGNORE_PATTERNS)
        if not overwrite_card and api.file_exists(repo_id, CARD_NAME, revision=revision):
            ignore.append(CARD_NAME)
        return api.upload_folder(repo_id=repo_id, folder_path=directory, revision=None if create_pr else revision,
                                 commit_message=commit_message, ignore_patterns=ignore, create_pr=create_pr,
                                 delete_patterns=[f"{EXPORT_DIR}/*"])
    except Exception as e:  # the token must never show up in an error
        raise PushError(_redact(f"uploading {directory} to {where} failed: {type(e).__name__}: {e}. The local files "
                                f"are unchanged; retry with `eqzoo publish {repo_id} {directory}`.", token)) from None


def push_to_hub(model: nn.Module, repo_id: str, commit_message: str = DEFAULT_MESSAGE, token: str | None = None,
                revision: str | None = None, private: bool = False, create_pr: bool = False,
                model_config: dict | None = None, model_card: dict | None = None, model_args: dict | None = None,
                task_name: str = "image-classification", safe_serialization: bool | str = True,
                data_config: dict | None = None, *, card_data: dict | None = None,
                save_directory: str | os.PathLike | None = None, overwrite_card: bool = False):
    """Save ``model`` (to ``save_directory``, else a temporary folder) and upload it to ``repo_id``.

    The arguments are timm's ``push_to_hf_hub``'s, in its order: ``model_config`` holds
    ``label_names``, ``model_card`` timm's card fields, ``data_config`` the input the weights
    expect. eqzoo writes safetensors only (``safe_serialization`` must be True) and its card's
    task is image classification. After them, eqzoo's own: ``card_data`` (see
    :func:`save_pretrained`), ``save_directory``, and ``overwrite_card`` (replace a README.md
    already on the Hub, which is otherwise kept, as timm keeps it).
    Returns the CommitInfo (``.oid`` is the commit to pin with ``hf-hub:repo_id@oid``)."""
    if safe_serialization is not True:
        raise ValueError(f"safe_serialization={safe_serialization!r}: eqzoo writes model.safetensors only "
                         "(a pickle could run code when loaded); leave it at True")
    if task_name != "image-classification":
        raise ValueError(f"task_name={task_name!r}: eqzoo's models are image classifiers "
                         "('image-classification'); a model with num_classes=0 is tagged as a feature extractor")
    with tempfile.TemporaryDirectory(prefix="eqzoo-push-") as tmp:
        folder = Path(save_directory) if save_directory is not None else Path(tmp) / "model"
        save_pretrained(model, folder, model_config, model_args, data_config=data_config, card_data=card_data,
                        model_card=model_card, repo_id=repo_id)
        return upload_folder(folder, repo_id, commit_message, token=token, revision=revision, private=private,
                             create_pr=create_pr, overwrite_card=overwrite_card)


def publish(directory: str | os.PathLike, repo_id: str, commit_message: str = DEFAULT_MESSAGE,
            token: str | None = None, revision: str | None = None, private: bool = False, create_pr: bool = False,
            overwrite_card: bool = False, check: bool = True):
    """Upload a saved folder with its card to ``repo_id`` (``eqzoo publish REPO_ID LOCAL_PATH``,
    in the order of ``hf upload``). With ``check`` it is first loaded back (config validated,
    weights complete, bases matching), so what is published loads. A card already on the Hub is
    kept unless ``overwrite_card``."""
    directory = check_saved_folder(directory)
    if check:
        timm.create_model(f"local-dir:{directory}", pretrained=True)
    return upload_folder(directory, repo_id, commit_message, token=token, revision=revision, private=private,
                         create_pr=create_pr, overwrite_card=overwrite_card)

"""Publishing to the Hugging Face Hub: upload a saved folder, or save a model and upload it.

Errors of the upload are translated in one place (:func:`upload_folder`): whatever went wrong is
a :class:`~eqzoo.errors.PushError` that never carries the token, and the local files stay.
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
from ..models._schema import EXPORT_DIR
from .files import check_saved_folder
from .save import save_pretrained

__all__ = ["IGNORE_PATTERNS", "upload_folder", "push_to_hub", "publish"]

# Never uploaded by eqzoo and never loaded: pickle-based checkpoints and editor/temp files.
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.tmp", ".*"]


def _redact(text: str, token: str | None) -> str:
    for secret in {token, get_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def upload_folder(directory: str | os.PathLike, repo_id: str, revision: str | None = None, private: bool = False,
                  token: str | None = None, commit_message: str = "Upload eqzoo model"):
    """Upload a saved folder (as written by :func:`save_pretrained`) to ``repo_id``; returns the
    CommitInfo. Creates the repo (and the ``revision`` branch) if needed. Pickles are never
    uploaded; files of a stale ``exported/`` are deleted. Token: ``token`` or the standard HF login."""
    directory = Path(directory)
    api = HfApi(token=token, library_name="eqzoo", library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=directory, revision=revision,
                                 commit_message=commit_message, ignore_patterns=IGNORE_PATTERNS,
                                 delete_patterns=[f"{EXPORT_DIR}/*"])
    except Exception as e:  # the token must never show up in an error
        raise PushError(_redact(f"uploading {directory} to {repo_id}{'@' + revision if revision else ''} failed: "
                                f"{type(e).__name__}: {e}. The local files are unchanged; retry with "
                                f"`eqzoo publish {directory} {repo_id}`.", token)) from None


def push_to_hub(model: nn.Module, repo_id: str, revision: str | None = None, private: bool = False,
                token: str | None = None, commit_message: str = "Upload eqzoo model", model_args: dict | None = None,
                card_data: dict | None = None, save_directory: str | os.PathLike | None = None):
    """Save ``model`` (to ``save_directory``, else a temporary folder) and upload it to ``repo_id``.
    Returns the CommitInfo (``.oid`` is the commit to pin with ``hf-hub:repo_id@oid``)."""
    with tempfile.TemporaryDirectory(prefix="eqzoo-push-") as tmp:
        folder = Path(save_directory) if save_directory is not None else Path(tmp)
        save_pretrained(model, folder, model_args=model_args, card_data=card_data, repo_id=repo_id)
        return upload_folder(folder, repo_id, revision=revision, private=private, token=token,
                             commit_message=commit_message)


def publish(directory: str | os.PathLike, repo_id: str, revision: str | None = None, private: bool = False,
            token: str | None = None, commit_message: str = "Upload eqzoo model", check: bool = True):
    """Upload a saved folder with its card. With ``check`` it is first loaded back (config
    validated, weights complete, bases matching), so what is published loads."""
    directory = check_saved_folder(directory)
    if check:
        timm.create_model(f"local-dir:{directory}", pretrained=True)
    return upload_folder(directory, repo_id, revision=revision, private=private, token=token,
                         commit_message=commit_message)

"""Atomic file writes: a reader (or a killed process) never leaves or sees half a file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file next to ``path``, then ``os.replace`` onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj, indent: int = 2) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=indent) + "\n", encoding="utf-8"))


def save_tensors(tensors: dict, path: Path) -> None:
    """A safetensors file of ``tensors`` (e.g. a state_dict), written atomically."""
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors sharing storage (tied weights); contiguous: channels_last
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))

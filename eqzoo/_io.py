"""Files: atomic writes and folder claims (a reader, or a killed process, never leaves or sees
half a file or a folder mixed from two writers), and safetensors files written and read whole.

Files and folders get the user's umask, as any file a program writes (``tempfile`` would make
them 0600 / 0700, which leaves shared run folders and caches unreadable to the group): temporary
folders are made with ``os.mkdir(..., 0o777)``, and a temporary file is given ``0o666 & ~umask``
before it is renamed into place.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import struct
from pathlib import Path

from safetensors.torch import load_file, save_file

from .errors import CheckpointError


def _unique_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def _umask() -> int:
    try:  # Linux: read it, since setting it to read it is not thread-safe
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file next to ``path``, then ``os.replace`` onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(path, "tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        # some writers (safetensors) replace the file with a private 0600 one of their own
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj, indent: int = 2) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=indent) + "\n", encoding="utf-8"))


def save_tensors(tensors: dict, path: Path) -> None:
    """A safetensors file of ``tensors`` (e.g. a state_dict), written atomically."""
    # clone: safetensors refuses tensors sharing storage (tied weights); contiguous: channels_last
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def check_safetensors(path: str | os.PathLike, source: str = "") -> Path:
    """Check that a file is a complete safetensors file (header parses, sizes add up) without
    loading it. Raises :class:`CheckpointError` naming the file and what to do."""
    path = Path(path)
    fix = (f"download it again (delete {path} from the Hugging Face cache or pass force_download) or "
           "re-publish it with eqzoo.push_to_hub") if source.startswith("hf-hub") else \
        "save it again with eqzoo.save_pretrained"
    name = f"{source}/{path.name}" if source else str(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{name} is not a valid safetensors file ({e}); {fix}") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "corrupt (trailing bytes)"
        raise CheckpointError(f"{name} is {state}: {size} bytes, expected {expected}; {fix}")
    return path


def load_tensors(path: str | os.PathLike) -> dict:
    """A safetensors file, checked to be complete first (a damaged file names itself)."""
    return load_file(str(check_safetensors(path)))


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(lock_path: Path, blocking: bool = True):
    """Hold an exclusive ``flock`` on ``lock_path`` (a folder, or a file created if needed) for
    the ``with`` block; yields False instead of waiting when ``blocking`` is False and another
    process holds it. The kernel drops the lock when its process dies, so a killed holder never
    blocks anyone."""
    lock_path = Path(lock_path)
    if lock_path.is_dir():
        fd = os.open(lock_path, os.O_RDONLY)
    else:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def new_sibling_dir(path: Path) -> Path:
    """A fresh, empty folder next to ``path`` (same file system, so it can be renamed onto it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(path, "new")
    os.mkdir(tmp, 0o777)
    return tmp


def replace_dir(new: Path, path: Path) -> None:
    """Move the complete folder ``new`` to ``path``, replacing what is there.

    Writers swap under a lock on the parent folder (no lock file is left behind), so concurrent
    writers serialise and the last one's folder wins whole. ``rename`` cannot replace a
    non-empty folder in one step: the old one is renamed aside first, so a reader sees the old
    folder, the new one, or (for that instant) none, never a mix."""
    new, path = Path(new), Path(path)
    with locked(path.parent):
        old = None
        if path.exists():
            old = _unique_sibling(path, "old")
            os.rename(path, old)
        try:
            os.rename(new, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""Files: atomic writes and folder swaps (a reader, or a killed process, never leaves or sees
half a file or a folder mixed from two writers), and safetensors files written and read whole.

Files and folders get the user's umask, as any file a program writes (``tempfile`` would make
them 0600 / 0700, which leaves shared run folders and caches unreadable to the group): temporary
folders are made with ``os.mkdir(..., 0o777)``, and a temporary file is given ``0o666 & ~umask``
before it is renamed into place.

Temporary names are ``.NAME.HOST.PID.HEX.{tmp,new,old}`` next to their target (HOST: a tag of
the machine's name). A writer that is killed leaves its temporary behind; the next write of the
same target removes those whose process is gone, on this machine only (a shared file system's
other machines run processes this one cannot see).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import struct
from pathlib import Path

from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from .errors import CheckpointError


HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _unique_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{HOST_TAG}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine. Where that cannot be asked safely (Windows:
    ``os.kill`` would end the process), every process counts as alive, so nothing is removed."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(path: Path) -> None:
    """Remove the temporaries of ``path`` left by writers that were killed: those of this machine
    whose process is gone. A live writer's temporaries are never touched."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{HOST_TAG}\.(\d+)\.[0-9a-f]{{8}}\.(tmp|new|old)")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:  # no parent yet, or not readable: nothing of ours there
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _target(path: Path) -> Path:
    """Where a write of ``path`` lands: a symbolic link is written through, into its target
    (replacing the link by a folder would leave the target stale and every other link to it)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


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
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
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
def locked(lock_file: Path, blocking: bool = True):
    """Hold an exclusive lock on ``lock_file`` (created if needed) for the ``with`` block; yields
    False instead of waiting when ``blocking`` is False and another holder has it. The operating
    system drops the lock when its process dies, so a killed holder never blocks anyone."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=-1 if blocking else 0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def new_sibling_dir(path: Path) -> Path:
    """A fresh, empty folder next to ``path`` (same file system, so it can be renamed onto it);
    the temporaries of killed writes of ``path`` are removed first."""
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _unique_sibling(path, "new")
    os.mkdir(tmp, 0o777)
    return tmp


def replace_dir(new: Path, path: Path) -> None:
    """Move the complete folder ``new`` to ``path``, replacing what is there.

    ``rename`` cannot replace a non-empty folder in one step: the folder in place is renamed
    aside first, so a reader sees the old folder, the new one, or (for that instant) none, never
    a mix. Concurrent writers need no lock: a writer whose rename finds ``path`` taken again
    moves that folder aside too and retries, so the last writer's folder ends up there whole.
    Each writer deletes the folders it moved aside."""
    new, path = Path(new), _target(path)
    aside = []
    try:
        while True:
            if path.exists():
                old = _unique_sibling(path, "old")
                try:
                    os.rename(path, old)
                    aside.append(old)
                except FileNotFoundError:  # another writer moved it aside first
                    pass
            try:
                os.rename(new, path)
                break
            except OSError as e:  # another writer's folder arrived in between
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) and not isinstance(e, FileExistsError):
                    raise
    except BaseException:
        if aside and not path.exists():  # put back what was there
            with contextlib.suppress(OSError):
                os.rename(aside.pop(), path)
        raise
    finally:
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)

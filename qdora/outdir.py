"""Output folders: checked before any work starts, and written atomically (a temporary name, every
file fsynced, one rename), so a reader or a crash never sees half an output."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

# Temporary entries (checkpoints, adapters, exports, metrics and summary rewrites) start with this prefix.
TMP = ".tmp-"


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def publish(tmp: str, path: str) -> None:
    """Move the complete folder or file `tmp` to `path`. An existing `path` is first renamed to a
    temporary name and removed afterwards, so at every moment `path` is either absent, the old
    complete version or the new one (never a half-removed folder)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(tmp):
        _fsync_tree(tmp)
    else:
        _fsync(tmp)
    old = None
    if os.path.isdir(path):
        old = os.path.join(parent, f"{TMP}old-{os.path.basename(path)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str, obj, **kwargs) -> None:
    """Write JSON to `path` atomically (temporary file, fsync, rename)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), TMP + os.path.basename(path))
    with open(tmp, "w") as f:
        json.dump(obj, f, **kwargs)
    publish(tmp, path)


def prepare_out_dir(out_dir: str, resume: bool = False,
                    hint: str = "pass a new folder, remove it, or add --resume=true") -> None:
    """Create `out_dir` to be written in place (train, compare): absent or empty, unless resuming
    (`hint` ends the non-empty error: what the command can do instead)."""
    if os.path.isfile(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a file; pass a folder path")
    if not resume and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is not empty; {hint}")
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"out_dir {out_dir!r} is not writable; pass another folder")


def check_new_out_dir(out_dir: str) -> str:
    """For an output published whole (export, analyze): refuses a non-empty out_dir and returns the
    parent folder, created if needed, in which `staged_folder` fills the temporary folder."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"out_dir {out_dir!r} exists and is not an empty folder; pass a new path")
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {parent!r} for out_dir ({exc.strerror}); pass a writable out_dir") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {parent!r}; pass an out_dir in a writable folder")
    return parent


def _publish_modes(folder: str) -> None:
    """Ordinary permissions (umask applied) instead of mkdtemp's and safetensors' owner-only ones."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


@contextmanager
def staged_folder(out_dir: str, command: str) -> Iterator[str]:
    """A temporary folder beside `out_dir` (checked by check_new_out_dir) to fill; when the block
    completes it becomes `out_dir` (ordinary permissions, fsynced, renamed), else it is removed."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=f"{TMP}{command}-", dir=parent)
    try:
        yield tmp
        _publish_modes(tmp)
        _fsync_tree(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked before the work began (never removes what appeared since)
        os.replace(tmp, out_dir)
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

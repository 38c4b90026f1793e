"""Atomic writes: a reader (or a run that was killed and restarted) sees the old file or folder or the new one,
never a torn one. Each helper writes under a temporary name next to the target, on the same filesystem, and
renames it into place; the temporary name carries the process id, so concurrent writers never share one."""
from __future__ import annotations

import os
import shutil
from typing import BinaryIO, Callable


def _temporary(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())


def write_file(path: str, write: Callable[[BinaryIO], None], sync: bool = True) -> None:
    """Write ``path`` atomically with ``write(f)`` on a binary file object (e.g. ``lambda f: torch.save(obj, f)``)."""
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if sync:
                # The data must be on disk before the rename is: after a crash the new name must
                # not point at an empty file. The rename itself may be lost; the old file is fine.
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    write_file(path, lambda f: f.write(data), sync=sync)


def write_text(path: str, text: str, sync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"), sync=sync)


def write_dir(path: str, write: Callable[[str], None], replace: bool = False, sync: bool = True) -> None:
    """Build a folder with ``write(tmp_dir)`` under a temporary name, then rename it to ``path``.

    Without ``replace`` an existing ``path`` makes the rename fail (OSError), and ``path`` is left as
    it was. With ``replace`` an existing ``path`` is deleted first: NOT atomic, a kill between the
    deletion and the rename leaves no folder at ``path`` (a rename cannot replace a non-empty folder).
    """
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of a process with the same id
    try:
        write(tmp)
        if sync:
            _fsync_tree(tmp)
        if replace:
            shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

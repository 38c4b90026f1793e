"""Atomic writes: a reader (or a run that was killed and restarted) sees the old file or folder or the new one,
never a torn one. Each helper writes under a temporary name next to the target, on the same filesystem, and
renames it into place; the temporary name carries the process id, so concurrent writers never share one.

A folder that already exists is replaced by swapping the two names in one step (Linux ``renameat2`` with
``RENAME_EXCHANGE``), so there is no moment without a folder at the target. Where the kernel or filesystem
cannot swap, the old folder is renamed aside first; a kill between the two renames leaves it there, and
``recover_dir`` (called by the next ``write_dir``, and by readers that care) puts it back.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import sys
from typing import BinaryIO, Callable

# Suffix of a folder renamed aside while its replacement moves in (only where the names cannot be swapped).
ASIDE = ".atomic-old"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


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


def exchange(a: str, b: str) -> bool:
    """Swap the names ``a`` and ``b`` (both must exist) in one atomic step; False where this system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def recover_dir(path: str) -> None:
    """Finish a folder replacement a kill interrupted: the old folder back where ``path`` is missing, else dropped.

    Also removes the temporary folders of writers that died (their process id is gone): half a new
    folder, or the old one a swap had moved out.
    """
    aside = path + ASIDE
    if os.path.isdir(aside):
        if os.path.lexists(path):
            shutil.rmtree(aside)  # the replacement completed; only the deletion of the old folder was lost
        else:
            os.rename(aside, path)
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        pid = tmp[len(path) + 4:]
        if pid.isdigit() and os.path.isdir(tmp) and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_dir(path: str, write: Callable[[str], None], replace: bool = False, sync: bool = True) -> None:
    """Build a folder with ``write(tmp_dir)`` under a temporary name, then move it to ``path``.

    Without ``replace`` an existing ``path`` makes the move fail (OSError), and ``path`` is left as
    it was. With ``replace`` an existing ``path`` is swapped out in one step (``exchange``) and then
    deleted; where names cannot be swapped it is renamed aside first (see ``recover_dir``).
    """
    recover_dir(path)
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of a process with the same id
    try:
        write(tmp)
        if sync:
            _fsync_tree(tmp)
        if replace and os.path.lexists(path):
            _swap_in(tmp, path)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: str, path: str) -> None:
    if exchange(new, path):
        shutil.rmtree(new)  # which now holds the old folder
        return
    aside = path + ASIDE
    os.rename(path, aside)
    os.rename(new, path)  # a kill before this line leaves the old folder at `aside`: recover_dir restores it
    shutil.rmtree(aside)

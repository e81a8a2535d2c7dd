"""Writing files so that a crash leaves the old content or the new, never a mix.

Small files (the record, `latest`) are written to a temporary sibling, flushed to disk and renamed over the target.
A checkpoint directory is written whole under a hidden staging name and then put in place: renamed when the target
does not exist, or exchanged with it in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`, on file systems that
support it: ext4, xfs, btrfs, tmpfs; anywhere else two renames, whose gap a resume reports with both copies named).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import uuid

_CHUNK = 8 << 20


def fsync_dir(path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest_file(path, *, flush: bool = False) -> dict:
    """{"sha256", "bytes"} of a file; with `flush`, its content is forced to disk first (a file another library wrote
    and closed may still sit in the page cache)."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        if flush:
            os.fsync(handle.fileno())
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"sha256": sha.hexdigest(), "bytes": size}


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path, data: bytes) -> None:
    """Replace `path` by `data`: a temporary sibling, flushed, renamed over it, the directory flushed."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_dir(folder)


def write_json_atomic(path, payload: dict) -> None:
    write_atomic(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


# renameat2(2): exchange two paths atomically (Linux 3.15+, glibc 2.28+; not every file system)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = None


def _renameat2():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    function = getattr(_libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange_paths(first, second) -> bool:
    """Swap two existing paths in one atomic step. False when this system or file system cannot (nothing moved)."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"exchanging {first} and {second}: {os.strerror(code)}")


def put_in_place(staging, target, *, outgoing) -> None:
    """Make the complete directory `staging` become `target`. An existing `target` is swapped out atomically and
    removed; where the file system cannot swap, it is first renamed to `outgoing`, then `staging` to `target` (a crash
    between the two leaves both complete copies under their hidden names, and `target` missing)."""
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif exchange_paths(staging, target):
        fsync_dir(parent)
        remove_tree(staging)  # now the old content
    else:
        os.rename(target, outgoing)
        os.rename(staging, target)
        fsync_dir(parent)
        remove_tree(outgoing)
    fsync_dir(parent)


def fsync_tree(path) -> None:
    """Flush every file and directory under `path` to disk."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


def remove_tree(path) -> None:
    shutil.rmtree(path, ignore_errors=True)


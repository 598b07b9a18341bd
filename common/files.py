"""Files: guarded and atomic writes, free space before a write, SHA-256 of a file; one clear line when a write fails.

    from common.files import check_free_space, guarded_write, write_atomic
    check_free_space(out_dir, {"checkpoints": 3 * checkpoint_bytes, "token cache": 2 * n_tokens})
    with guarded_write(path, needed=len(data)) as write:     # any failure inside -> WriteFailed
        tmp = write.temporary(path + ".tmp")                  # removed if the write fails
        ...write tmp..., os.replace(tmp, path)                # the previous file stays until this rename

A failed write (ENOSPC, EDQUOT, EIO, a permission change, torch.save's "unexpected pos", a safetensors or
tokenizers I/O error) becomes WriteFailed, whose one-line message names the file, the cause, what was needed
and what is free, after the write's temporaries are removed. Anything else (a bug) passes through unchanged.
"""
from __future__ import annotations

import errno
import hashlib
import json
import tempfile
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from common.formats import human

# errno -> (what happened, what to do); {short} is filled with the bytes missing where that is known
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free {short} or choose another output directory"),
    errno.EDQUOT: ("disk quota exceeded", "free {short} within your quota or choose another output directory"),
    errno.EIO: ("I/O error", "check the disk (dmesg, its SMART health) or choose another output directory"),
    errno.EACCES: ("permission denied", "make the directory writable again (did its permissions change?)"),
    errno.EPERM: ("operation not permitted", "make the directory writable again (did its permissions change?)"),
    errno.EROFS: ("read-only file system", "remount it read-write or choose another output directory"),
    errno.ENOENT: ("a file or directory vanished mid-write", "is another process writing into this directory?"),
}
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")  # how Rust (safetensors, tokenizers) reports an errno
# how torch.save's zip writer reports a short write when given a path (it loses the errno)
_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def existing_ancestor(path: str) -> str:
    """path, or its nearest parent that exists (free space is measured there)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int:
    """Bytes an unprivileged process may still write on path's file system."""
    return shutil.disk_usage(existing_ancestor(path)).free


# ------------------------------------------------------------------------------------------ failed writes
class WriteFailed(Exception):
    """A write that failed after its partial files were removed; str() is one line naming file, cause and space."""

    def __init__(self, path: str, cause: str, free: int, needed: int | None = None, errno_code: int | None = None):
        self.path, self.cause, self.free, self.needed, self.errno = path, cause, free, needed, errno_code
        super().__init__(self._line())

    def _line(self) -> str:
        what, fix = _CAUSES.get(self.errno, (None, "check the disk and the directory's permissions"))
        cause = f"{what} ({errno.errorcode[self.errno]})" if what else self.cause
        if what and what.lower() not in self.cause.lower():  # keep what the library said, unless it says the same
            cause += f": {self.cause}"
        short = human(self.needed - self.free) if self.needed and self.needed > self.free else "space"
        need = f"needed ~{human(self.needed)}" if self.needed is not None else "needed: not known in advance"
        return (f"could not write {self.path}: {cause}; {need}, {human(self.free)} free there; "
                f"its partial files were removed and any previous version is intact; {fix.format(short=short)}")


def _find_errno(exc: BaseException) -> int | None:
    """The errno behind exc: its own, one in its chain (torch.save to a file object), or Rust's 'os error N'."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        if m := _OS_ERROR_IN_TEXT.search(str(exc)):
            return int(m.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def _is_write_error(exc: BaseException) -> bool:
    """OSError, torch.save's short write, or a Rust library's I/O error: not a bug to let through."""
    text = str(exc)
    return (isinstance(exc, OSError) or _find_errno(exc) is not None
            or (isinstance(exc, RuntimeError) and any(s in text for s in _TORCH_SHORT_WRITE)))


def as_write_failed(exc: BaseException, path: str, needed: int | None = None) -> WriteFailed | None:
    """exc as WriteFailed (free space measured now), or None if exc is not a failed write."""
    if isinstance(exc, WriteFailed):
        return exc
    if not _is_write_error(exc):
        return None
    code, free = _find_errno(exc), free_bytes(path)
    lines = str(exc).strip().splitlines()
    detail = getattr(exc, "strerror", None) or (lines[0] if lines else type(exc).__name__)
    if code is None and needed is not None and free < needed:  # torch.save lost the errno; the numbers tell
        code, detail = errno.ENOSPC, f"torch.save: {detail}"
    return WriteFailed(path, detail.strip()[:160], free, needed, code)


@dataclass
class PendingWrite:
    """What guarded_write undoes on failure: temporaries to delete, callbacks that restore the previous state."""

    needed: int | None = None
    temporaries: list[str] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)

    def temporary(self, path: str) -> str:
        self.temporaries.append(path)
        return path

    def on_failure(self, fn: Callable[[], None]) -> None:
        self.undo.append(fn)

    def roll_back(self) -> None:
        for path in self.temporaries:
            remove_quietly(path)
        for fn in reversed(self.undo):
            try:
                fn()
            except OSError:  # best effort: the disk that just failed may fail again
                pass


def remove_quietly(path: str) -> None:
    """Delete a file or directory tree if it exists; never raises."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


@contextmanager
def guarded_write(path: str, needed: int | None = None) -> Iterator[PendingWrite]:
    """Run a write to path; a failure rolls back what was registered and is raised as WriteFailed."""
    pending = PendingWrite(needed)
    try:
        yield pending
    except BaseException as e:
        failed = as_write_failed(e, path, pending.needed) if isinstance(e, Exception) else None
        pending.roll_back()
        if failed is None:
            raise
        if failed is not e:  # free space is measured again after the roll-back returned the partial files' space
            failed = WriteFailed(failed.path, failed.cause, free_bytes(path), failed.needed, failed.errno)
        raise failed from e


# ------------------------------------------------------------------------------------- space before a run
class NotEnoughSpace(ValueError):
    """The run would not fit on its disk; the message is one line with the numbers and the fix."""


def check_free_space(path: str, needs: dict[str, int], already_on_disk: int = 0, margin: float = 0.1,
                     fix: str = "free space, choose another --out-dir or keep fewer checkpoints") -> int:
    """Free bytes at path; NotEnoughSpace if sum(needs) + margin (the estimates' error), less what of it is
    already on disk (a resumed run's checkpoints and caches), does not fit."""
    total, free = sum(needs.values()), free_bytes(path)
    required = max(0, int(total * (1 + margin)) - already_on_disk)
    if required > free:
        parts = ", ".join(f"{name} {human(n)}" for name, n in needs.items())
        there = f", {human(already_on_disk)} of it already written" if already_on_disk else ""
        raise NotEnoughSpace(f"not enough disk space for {path}: the run needs ~{human(total)} ({parts}) "
                             f"+{margin:.0%} margin{there}: {human(required)} more, but only {human(free)} is "
                             f"free on {existing_ancestor(path)}; {fix}")
    return free


def dir_bytes(path: str) -> int:
    """Bytes of the files under path (already on disk, so a resumed run need not find them free again)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# safetensors' JSON header entry per tensor, measured on this project's checkpoints
SAFETENSORS_PER_TENSOR = 100


def unique_tensors(tensors) -> list:
    """Tensors with shared storage counted once (a tied LM head and its embedding are one tensor)."""
    seen, unique = set(), []
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nested dict/list/tuple (optimizer state, say), each shared one once."""
    import torch

    found = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return sum(t.numel() * t.element_size() for t in unique_tensors(found))


def sha256_file(path: str) -> str:
    """The file's SHA-256, hex, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str) -> object | None:
    """The JSON document in path; None where there is no such file (a run that has not written it yet)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_atomic(path: str, data: bytes | str) -> None:
    """Write to a temporary sibling, fsync, rename over path; a failure is WriteFailed and path is untouched."""
    data = data.encode() if isinstance(data, str) else data
    with guarded_write(path, len(data)) as write:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
        write.temporary(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

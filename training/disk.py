"""Disk: what a run will write, whether it fits, and one clear line when a write fails anyway.

    from training.disk import check_free_space, checkpoint_bytes, guarded_write
    check_free_space(out_dir, {"checkpoints": 3 * checkpoint_bytes(model), "token cache": 2 * n_tokens})
    with guarded_write(path, needed=len(data)) as write:     # any failure inside -> WriteFailed
        tmp = write.temporary(path + ".tmp")                  # removed if the write fails
        ...write tmp..., os.replace(tmp, path)                # the previous file stays until this rename

A failed write (ENOSPC, EDQUOT, EIO, a permission change, torch.save's "unexpected pos", a safetensors or
tokenizers I/O error) becomes WriteFailed, whose one-line message names the file, the cause, what was needed
and what is free, after the write's temporaries are removed. Anything else (a bug) passes through unchanged.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:  # torch is imported where tensors are counted, so data/ can guard its writes without it
    from torch import nn

    from config import ModelConfig

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


def human(n: int | None) -> str:
    """Bytes in binary units, e.g. 3.0 MiB."""
    if n is None:
        return "unknown"
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


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


def _unique_tensors(tensors) -> list[torch.Tensor]:
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
    return sum(t.numel() * t.element_size() for t in _unique_tensors(found))


# per-tensor bookkeeping in the files, measured on this project's checkpoints: safetensors' JSON header entry,
# torch.save's zip record (local + central header, 64-byte alignment) and pickle, AdamW's per-parameter step
_SAFETENSORS_PER_TENSOR = 100
_STATE_PER_TENSOR = 250
_FIXED = 16 * 1024  # meta.json (settings, model config: ~3 KiB), torch RNG state (~5 KiB), headers


def checkpoint_bytes(model: "nn.Module | ModelConfig | int", optimizer_slots: int = 2, dtype_bytes: int = 4) -> int:
    """Estimated size of one checkpoint: weights + AdamW's moments (optimizer_slots per weight) + bookkeeping.

    model: a model, a ModelConfig (its model is built on the meta device: no memory, no time) or a parameter
    count (then dtype_bytes per value, fp32 as the pipeline trains).
    """
    if hasattr(model, "__dataclass_fields__"):  # a ModelConfig
        import torch

        from models import build_model

        with torch.device("meta"):
            model = build_model(model)
    if isinstance(model, int):
        n_tensors = 0
        weights = model * dtype_bytes
    else:
        params = _unique_tensors(model.parameters())
        weights = sum(p.numel() * p.element_size() for p in params)
        n_tensors = len(params)
    per_tensor = n_tensors * (_SAFETENSORS_PER_TENSOR + optimizer_slots * _STATE_PER_TENSOR)
    return weights * (1 + optimizer_slots) + per_tensor + _FIXED


def peak_checkpoint_bytes(stage_bytes: list[int], keep_periodic: int = 2) -> int:
    """Most bytes the checkpoints directory holds at once over a run of stages (one checkpoint size each).

    save_checkpoint keeps every stage-end checkpoint and the newest keep_periodic others, and writes a new
    one before pruning, so during stage i: the earlier stages' ends + (keep_periodic + 1) of stage i's size.
    """
    return max(sum(stage_bytes[:i]) + (keep_periodic + 1) * b for i, b in enumerate(stage_bytes))


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


# temporaries each write site leaves if its process is killed mid-write (a failed write removes its own)
_TEMPORARY_PATTERNS = ("checkpoints/.tmp-*", ".tmp-*", "tokenizer.tmp-*", "cache/tokens-*.tmp-*",
                       "loss_curve.png.tmp-*")
# set-aside previous versions: put back if the write that replaces them was killed before its rename
_ASIDE_PATTERNS = {"checkpoints/.old-*": lambda name: name[len(".old-"):].rsplit("-", 1)[0],
                   "tokenizer.old-*": lambda name: "tokenizer"}


def remove_stale_temporaries(out_dir: str, log=print) -> int:
    """Delete what killed writers left in out_dir and restore set-aside copies; return the bytes freed.

    Call it only while holding the run's lock (training.runlock): a live writer's temporaries look the same.
    """
    import glob

    freed = 0
    for pattern in _TEMPORARY_PATTERNS:
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            freed += dir_bytes(path) if os.path.isdir(path) else os.path.getsize(path)
            remove_quietly(path)
    for pattern, original in _ASIDE_PATTERNS.items():
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            target = os.path.join(os.path.dirname(path), original(os.path.basename(path)))
            if os.path.exists(target):
                freed += dir_bytes(path)
                remove_quietly(path)
            else:
                os.replace(path, target)
                log(f"note: restored {target}, set aside by a write that was killed before it finished")
    if freed:
        log(f"note: removed {human(freed)} of temporary files left in {out_dir} by a killed run")
    return freed

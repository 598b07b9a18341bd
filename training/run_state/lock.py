"""One process per run: a lock file in the run directory, taken before anything is written, held for the run's life.

    from training.run_state.lock import acquire, RunLocked
    with acquire(out_dir) as lock:          # RunLocked (one line: holder's PID, host, start, command) if in use
        ...train...                         # released on exit; a killed holder's lock is taken over next time

out_dir/run.lock is JSON naming its holder (pid, host, start time, command line, the process's kernel start time,
the boot id, the torchrun job) and is held with flock(2) on an open descriptor, so the kernel releases it the
moment the holder dies, however it dies. A lock on this host whose holder is gone (no flock, and its PID dead, a
zombie, or reused by a younger process) is taken over with a one-line notice. A lock from another host is never
taken over: its process cannot be checked from here, and the message says how to remove it.

The lock appears atomically, complete (written aside, then hard-linked into place; O_EXCL where links are not
supported), and a takeover happens under the dead lock's flock and renames the new lock over it, so of any number
of processes starting at once exactly one wins. Without flock (some network file systems) liveness falls back
to the PID and its start time, and two simultaneous takeovers of the same dead lock could both succeed.

torchrun: only rank 0 acquires (the others share its lock; the caller broadcasts the outcome). The lock records
TORCHELASTIC_RUN_ID, so when an elastic job restarts its workers, the new rank 0 takes over the killed one's lock
with a notice that says it is the same job restarted; a live holder is never shared, whatever its job.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass

from common.files import guarded_write
from common.processes import proc_stat, process_alive

LOCK_NAME = "run.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # the file system cannot flock
_NO_LINK = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)  # the file system cannot hard-link
_ATTEMPTS = 50  # rounds of create-or-take-over while others race (each lost round means someone else moved)


class RunLocked(ValueError):
    """Another process holds the run directory; the message is one line naming it and what to do."""


@dataclass
class Holder:
    """Who holds a lock, as recorded in its file."""

    pid: int
    host: str
    started: float  # time.time() when the lock was taken
    command: str
    pid_start_ticks: int | None  # /proc/<pid>/stat field 22: tells a reused PID from the holder
    boot_id: str | None  # a different boot: every PID recorded before it is dead
    torchelastic_run_id: str | None
    token: str  # unique per acquisition

    @classmethod
    def me(cls) -> "Holder":
        command = shlex.join([os.path.basename(sys.executable), *sys.argv])
        return cls(os.getpid(), socket.gethostname(), time.time(), command,
                   _start_ticks(os.getpid()), _boot_id(), os.environ.get("TORCHELASTIC_RUN_ID"), uuid.uuid4().hex)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        command = self.command if len(self.command) <= 100 else self.command[:97] + "..."
        job = f", torchrun job {self.torchelastic_run_id}" if self.torchelastic_run_id else ""
        return f"PID {self.pid} on host {self.host}, started {started} ({_ago(self.started)}{job}): {command}"


def _ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _boot_id() -> str | None:
    return _read_first_line("/proc/sys/kernel/random/boot_id")


def _start_ticks(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22: start time in clock ticks since boot


def holder_alive(h: Holder) -> bool:
    """Whether the holder (on this host) still runs: its PID exists, is no zombie, and is not a reuse."""
    if h.boot_id and _boot_id() and h.boot_id != _boot_id():
        return False
    if not process_alive(h.pid):  # a zombie's descriptors (and flock) are gone too
        return False
    fields = proc_stat(h.pid)
    return not (h.pid_start_ticks and fields and int(fields[19]) != h.pid_start_ticks)


def _parse(text: str) -> Holder | None:
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return None


def _flock(fd: int) -> bool | None:
    """True if fd's file is now flocked by us, False if someone else holds it, None if flock is unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ------------------------------------------------------------------------------------------------ the lock
class RunLock:
    """A held run lock; release() (or leaving the with-block) removes it, and only if it is still this one."""

    def __init__(self, path: str, fd: int, holder: Holder):
        self.path, self.holder, self._fd = path, holder, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file if it is still ours (never one another process has since created); idempotent."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):  # unlinked while still flocked: no one can grab it in between
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(out_dir: str, log=print) -> RunLock:
    """Lock out_dir for this process (creating out_dir); RunLocked if another live process holds it.

    A dead holder's lock on this host is taken over with a one-line notice through log.
    """
    path = os.path.join(out_dir, LOCK_NAME)
    with guarded_write(path):
        os.makedirs(out_dir, exist_ok=True)
    me = Holder.me()
    for _ in range(_ATTEMPTS):
        lock = _create(path, me) or _take_over(path, me, log)
        if lock is not None:
            return lock
        time.sleep(0.02)  # another process is mid-way creating, releasing or taking over
    raise RunLocked(f"{out_dir}: could not take {path} in {_ATTEMPTS} tries while other processes kept changing it; "
                    "is a script starting runs in this directory in a loop? Stop it, or choose another --out-dir")


def _write_new(path: str, me: Holder) -> tuple[str, int, bool | None]:
    """(temporary path, descriptor, flocked?) of a complete lock file written beside path, not yet in place."""
    tmp = f"{path}.{me.token}.tmp"
    with guarded_write(path) as write:
        fd = os.open(write.temporary(tmp), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps(asdict(me)).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
    return tmp, fd, _flock(fd)


def _create(path: str, me: Holder) -> RunLock | None:
    """The lock, if path did not exist; None if it does."""
    tmp, fd, _ = _write_new(path, me)
    try:
        os.link(tmp, path)  # atomic, and fails if path exists: the lock appears complete or not at all
        return RunLock(path, fd, me)
    except FileExistsError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_LINK:
            raise
        return _create_exclusive(path, me)
    finally:
        os.unlink(tmp)


def _create_exclusive(path: str, me: Holder) -> RunLock | None:
    """_create without hard links: O_EXCL, then the content (a reader may briefly see an empty file)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    _flock(fd)
    os.write(fd, json.dumps(asdict(me)).encode())
    os.fsync(fd)
    return RunLock(path, fd, me)


def _take_over(path: str, me: Holder, log) -> RunLock | None:
    """The lock, if path's holder is dead; RunLocked if it lives; None if path changed meanwhile (try again)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        flocked = _flock(fd)
        if not _same_file(fd, path):  # released or taken over since we opened it
            return None
        holder = _parse(_read_text(path))
        if flocked is False:  # someone holds it: its recorded holder, or one taking it over right now
            if holder is None:  # its creator is still writing it (file systems without hard links)
                return None
            _refuse_live(path, holder, me)
            _wait_for_takeover(fd, path, holder)
            return None
        if holder is None and time.time() - os.fstat(fd).st_mtime < 5:  # being written (no hard links here)
            return None
        if holder is not None and (holder.host != me.host or holder_alive(holder)):
            _refuse_live(path, holder, me)
        return _replace(path, me, holder, log)
    finally:
        os.close(fd)  # and with it the old lock's flock: the new file is in place (or we refused)


def _wait_for_takeover(fd: int, path: str, dead: Holder) -> None:
    """A flocked lock whose recorded holder is dead: another process is replacing it (milliseconds), or a process
    the holder started still has it open (then RunLocked, since that process may still write)."""
    deadline = time.time() + 2
    while time.time() < deadline:
        if not _same_file(fd, path):
            return
        time.sleep(0.02)
    raise RunLocked(f"{os.path.dirname(path)} is in use: {path} is still held open by a process that "
                    f"{dead.describe()} started, though PID {dead.pid} has exited; find it with `fuser {path}` and "
                    "stop it, or choose another --out-dir")


def _replace(path: str, me: Holder, dead: Holder | None, log) -> RunLock | None:
    """Rename a new lock over the dead holder's (its flock still held by the caller); log the notice."""
    tmp, fd, _ = _write_new(path, me)
    os.replace(tmp, path)
    if _parse(_read_text(path)) != me:  # without flock another taker may have replaced it too
        os.close(fd)
        return None
    if dead is None:
        log(f"note: took over {path}, which was unreadable (not written by a run, or cut short)")
    else:
        job = (f"; the same torchrun job ({dead.torchelastic_run_id}), restarted"
               if dead.torchelastic_run_id and dead.torchelastic_run_id == me.torchelastic_run_id else "")
        log(f"note: took over {path} from {dead.describe()}, which is no longer running{job}")
    return RunLock(path, fd, me)


def refuse_if_held(out_dir: str) -> None:
    """RunLocked (one line naming the holder) if a live process holds out_dir's lock; nothing is written."""
    path = os.path.join(out_dir, LOCK_NAME)
    text = _read_text(path) if os.path.exists(path) else ""
    holder = _parse(text) if text else None
    if holder is not None:
        _refuse_live(path, holder, Holder.me())


def _refuse_live(path: str, holder: Holder, me: Holder) -> None:
    """RunLocked naming the holder and what to do; returns only if the recorded holder is dead, on this host."""
    out_dir = os.path.dirname(path)
    if holder.host != me.host:
        raise RunLocked(f"{out_dir} is in use by a run on another host: {holder.describe()}; this host "
                        f"({me.host}) cannot check it: if you know it has stopped, delete {path}; else choose "
                        "another --out-dir")
    if holder_alive(holder):
        raise RunLocked(f"{out_dir} is in use by another run: {holder.describe()}; wait for it to finish, stop it "
                        f"(kill {holder.pid}), or choose another --out-dir")

"""One process per run: real processes contend for a run directory's lock; exactly one holds it, the others are
told who (PID, host, start, command); a killed holder's lock is taken over with a notice, another host's never."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest

from common.files import WriteFailed
from tests.helpers import ROOT
from training.run_state.lock import LOCK_NAME, Holder, RunLocked, _start_ticks, acquire

# a contender: waits until start_at, tries the lock, says what happened, holds it hold_s seconds if it won;
# with fork=1 it leaves a child that keeps the lock's descriptor open (a worker outliving its run)
CONTENDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from training.run_state.lock import RunLocked, acquire
out_dir, start_at, hold_s, fork = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
time.sleep(max(0.0, start_at - time.time()))
try:
    lock = acquire(out_dir)
except RunLocked as e:
    print("refused:", e, flush=True)
    sys.exit(2)
print("acquired", os.getpid(), flush=True)
if fork:
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print("child", child, flush=True)
time.sleep(hold_s)
lock.release()
""".format(root=ROOT)


def contender(out_dir, hold_s: float = 0.0, start_at: float = 0.0, fork: bool = False, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CONTENDER, str(out_dir), str(start_at), str(hold_s),
                             "1" if fork else "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def holding(out_dir, **kwargs) -> subprocess.Popen:
    """A live process that has acquired out_dir's lock."""
    p = contender(out_dir, hold_s=60, **kwargs)
    line = p.stdout.readline()
    assert line.startswith("acquired"), line
    return p


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def lock_file(out_dir) -> dict:
    return json.loads((out_dir / LOCK_NAME).read_text())


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    holder = holding(tmp_path)
    try:
        second = contender(tmp_path)
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 2 and out.count("\n") == 1, out
        for fact in (f"PID {holder.pid}", f"host {socket.gethostname()}", "started", "-c", f"kill {holder.pid}",
                     "another --out-dir"):
            assert fact in out, (fact, out)
        with pytest.raises(RunLocked, match=f"PID {holder.pid}"):  # and in this process, too
            acquire(str(tmp_path))
        assert lock_file(tmp_path)["pid"] == holder.pid  # the refused ones changed nothing
    finally:
        stop(holder)


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_killed_holders_lock_is_taken_over_with_a_one_line_notice(tmp_path, reaped):
    holder = holding(tmp_path)
    holder.send_signal(signal.SIGKILL)
    if reaped:
        holder.wait()
    else:  # killed but not yet reaped: its PID still exists
        while (_read_state(holder.pid) or "Z") != "Z":
            time.sleep(0.01)
    notices = []
    with acquire(str(tmp_path), log=notices.append):
        assert lock_file(tmp_path)["pid"] == os.getpid()
    assert len(notices) == 1 and "\n" not in notices[0], notices
    assert f"took over {tmp_path / LOCK_NAME} from PID {holder.pid}" in notices[0]
    assert "no longer running" in notices[0]
    stop(holder)


def _read_state(pid: int) -> str | None:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_a_restarted_torchrun_job_is_recognised(tmp_path):
    env = dict(os.environ, TORCHELASTIC_RUN_ID="job-7")
    holder = holding(tmp_path, env=env)
    assert lock_file(tmp_path)["torchelastic_run_id"] == "job-7"
    stop(holder)
    notices = []
    os.environ["TORCHELASTIC_RUN_ID"] = "job-7"
    try:
        acquire(str(tmp_path), log=notices.append).release()
    finally:
        del os.environ["TORCHELASTIC_RUN_ID"]
    assert "torchrun job job-7" in notices[0] and "the same torchrun job (job-7), restarted" in notices[0]


def test_release_is_idempotent_and_frees_the_directory(tmp_path):
    out_dir = tmp_path / "new" / "run"  # created by acquire
    lock = acquire(str(out_dir))
    assert lock.held and (out_dir / LOCK_NAME).exists()
    lock.release()
    lock.release()
    assert not lock.held and os.listdir(out_dir) == []
    with acquire(str(out_dir)) as again:
        assert again.held
    assert os.listdir(out_dir) == []


def test_release_never_deletes_a_lock_another_process_took(tmp_path):
    first = acquire(str(tmp_path))
    os.remove(tmp_path / LOCK_NAME)  # someone deleted it by hand, believing the run dead
    second = holding(tmp_path)
    try:
        first.release()
        assert lock_file(tmp_path)["pid"] == second.pid  # the other process's lock survives the first's release
        with pytest.raises(RunLocked, match=f"PID {second.pid}"):
            acquire(str(tmp_path))
    finally:
        stop(second)


def write_lock(out_dir, **fields) -> None:
    """A lock file as a holder would leave it (nobody flocks it)."""
    holder = replace(Holder.me(), **fields)
    (out_dir / LOCK_NAME).write_text(json.dumps(asdict(holder)))


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path, host="gpu-node-17", pid=4_000_000)  # no such PID here, which proves nothing there
    before = (tmp_path / LOCK_NAME).read_text()
    with pytest.raises(RunLocked) as e:
        acquire(str(tmp_path), log=lambda line: pytest.fail(f"took over another host's lock: {line}"))
    text = str(e.value)
    assert "another host" in text and "PID 4000000 on host gpu-node-17" in text
    assert f"delete {tmp_path / LOCK_NAME}" in text and "\n" not in text
    assert (tmp_path / LOCK_NAME).read_text() == before


def test_a_live_holder_without_flock_is_refused_by_its_pid_and_start_time(tmp_path):
    """Where flock is missing (some network file systems) the recorded PID and its start time decide."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, pid_start_ticks=_start_ticks(sleeper.pid))
        with pytest.raises(RunLocked, match=f"PID {sleeper.pid}"):
            acquire(str(tmp_path))
    finally:
        stop(sleeper)


@pytest.mark.parametrize("why", ["pid reused", "rebooted", "pid gone"])
def test_a_dead_holders_lock_is_taken_over_however_it_died(tmp_path, why):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = _start_ticks(sleeper.pid)
        fields = {"pid reused": dict(pid=sleeper.pid, pid_start_ticks=ticks - 1),  # same PID, a younger process
                  "rebooted": dict(pid=sleeper.pid, pid_start_ticks=ticks, boot_id="an-earlier-boot"),
                  "pid gone": dict(pid=4_000_000, pid_start_ticks=None)}[why]
        write_lock(tmp_path, **fields)
        notices = []
        acquire(str(tmp_path), log=notices.append).release()
        assert len(notices) == 1 and f"PID {fields['pid']}" in notices[0] and "no longer running" in notices[0]
    finally:
        stop(sleeper)


def test_an_unreadable_old_lock_is_taken_over_with_a_notice(tmp_path):
    (tmp_path / LOCK_NAME).write_text("not json")
    os.utime(tmp_path / LOCK_NAME, (time.time() - 60, time.time() - 60))
    notices = []
    acquire(str(tmp_path), log=notices.append).release()
    assert len(notices) == 1 and "unreadable" in notices[0]


@pytest.mark.slow
def test_a_process_left_holding_the_lock_by_a_dead_run_is_named(tmp_path):
    """The run died but a process it forked still has the lock open: refused, saying how to find it."""
    holder = contender(tmp_path, hold_s=60, fork=True)
    assert holder.stdout.readline().startswith("acquired")
    child = int(holder.stdout.readline().split()[1])
    stop(holder)
    try:
        with pytest.raises(RunLocked) as e:
            acquire(str(tmp_path))
        assert f"PID {holder.pid} has exited" in str(e.value) and "fuser" in str(e.value)
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True], ids=["fresh directory", "dead holder's lock"])
def test_eight_processes_at_once_exactly_one_wins(tmp_path, stale):
    if stale:
        write_lock(tmp_path, pid=4_000_000)
    start_at = time.time() + 2.0  # all eight are up by then, and try within a millisecond or so of each other
    procs = [contender(tmp_path, hold_s=6.0, start_at=start_at) for _ in range(8)]  # held past any straggler
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    winners = [o for o in outputs if "acquired" in o]
    assert len(winners) == 1, outputs
    winner_pid = int(winners[0].split("acquired")[1].split()[0])
    refused = [o for o in outputs if o.startswith("refused:")]
    assert len(refused) == 7 and all(f"PID {winner_pid}" in o for o in refused), outputs
    assert sum("took over" in o for o in outputs) == (1 if stale else 0), outputs
    assert os.listdir(tmp_path) == []  # the winner released it; no temporaries left by the losers


def test_a_lock_released_while_a_contender_checks_it_is_not_mistaken_for_a_dead_one(tmp_path, monkeypatch):
    """The holder releases between a contender's open and flock: the contender must start over (and win
    silently), not take over the file the holder just unlinked as if its holder had died."""
    first = acquire(str(tmp_path))
    path = str(tmp_path / LOCK_NAME)
    os.utime(path, (time.time() - 60, time.time() - 60))
    real_open = os.open

    def open_then_release(file, flags, *args):
        fd = real_open(file, flags, *args)
        if file == path and flags == os.O_RDWR:
            first.release()
        return fd

    monkeypatch.setattr(os, "open", open_then_release)
    notices = []
    second = acquire(str(tmp_path), log=notices.append)
    monkeypatch.undo()
    assert notices == [] and second.held and lock_file(tmp_path)["token"] == second.holder.token
    second.release()


@pytest.mark.parametrize("missing", ["flock", "hard links"])
def test_file_systems_without_flock_or_hard_links_still_give_one_holder(tmp_path, monkeypatch, missing):
    def unsupported(code):
        def fail(*args, **kwargs):
            raise OSError(code, os.strerror(code))
        return fail

    if missing == "flock":
        monkeypatch.setattr(fcntl, "flock", unsupported(errno.ENOLCK))
    else:
        monkeypatch.setattr(os, "link", unsupported(errno.EPERM))
    first = acquire(str(tmp_path))
    with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):
        acquire(str(tmp_path))
    first.release()
    assert os.listdir(tmp_path) == []
    write_lock(tmp_path, pid=4_000_000)
    notices = []
    acquire(str(tmp_path), log=notices.append).release()
    assert len(notices) == 1 and "PID 4000000" in notices[0]


def test_an_unwritable_run_directory_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(WriteFailed, match="permission denied"):
        acquire(str(tmp_path / "run"))

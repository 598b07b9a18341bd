"""A dead launcher or rank leaves no live run (real torchrun processes on CPU, gloo).

Bounds stated in README's reliability section: a worker whose launcher dies stops within 60 s (measured: ~3 s) by
the SIGTERM path (save, exit 143, lock released); when a rank dies, the others on its host stop within 2 s
(elsewhere: 15 s of silence in the launcher's store), naming it.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, children, free_port
from training.run_state.checkpoint import latest_checkpoint
from common.processes import process_alive

pytestmark = pytest.mark.slow

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
RUN = ["--preset", "micro", "--dense_steps=400", "--moe_steps=10", "--grown_steps=10", "--checkpoint_interval=50",
       "--eval_interval=50", "--log_interval=10"]


def torchrun_line(out_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "train_tinystories.py", *RUN, "--out-dir", str(out_dir), *extra]


def workers_of(pid: int) -> list[int]:
    return sorted(children(pid), key=rank_of)


def rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env.get(b"RANK", b"-1"))


def start_training(out_dir, log_path):
    """torchrun of two workers, returned once both train in phase 1 (the log shows step 20)."""
    log = open(log_path, "w")
    proc = subprocess.Popen(torchrun_line(out_dir), cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while "step 20 " not in open(log_path).read():
        assert proc.poll() is None and time.monotonic() < deadline, open(log_path).read()[-3000:]
        time.sleep(0.2)
    workers = workers_of(proc.pid)
    assert len(workers) == 2, workers
    return proc, workers


def wait_gone(pids: list[int], limit: float) -> float:
    started = time.monotonic()
    while any(process_alive(p) for p in pids):
        if time.monotonic() - started > limit:
            for p in pids:
                if process_alive(p):
                    os.kill(p, signal.SIGKILL)
            pytest.fail(f"workers {pids} still alive {limit:.0f} s after the kill")
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_killed_launcher_stops_its_workers_who_save_and_the_same_line_resumes(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    proc, workers = start_training(out, log)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher alone: its workers are in sessions of their own
    proc.wait()
    took = wait_gone(workers, limit=60)
    text = open(log).read()
    assert "the launcher" in text and "is gone" in text and "Stopped by SIGTERM; checkpoint saved" in text, text[-2000:]
    ckpt = latest_checkpoint(str(out))
    assert ckpt.phase == "dense" and ckpt.meta["step"] < 400  # did not train on without its launcher
    assert not (out / "run.lock").exists()
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert not [r for r in records if r["kind"] == "outcome" and r.get("status") == "finished"]
    resumed = subprocess.run(torchrun_line(out, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming from {ckpt.path}" in resumed.stdout and "ALL CHECKS PASSED" in resumed.stdout
    print(f"workers gone {took:.1f} s after the launcher's SIGKILL")


def test_a_killed_rank_is_named_by_the_survivor_which_stops_at_once(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    proc, (rank0, rank1) = start_training(out, log)
    os.kill(rank1, signal.SIGKILL)
    took = wait_gone([rank0], limit=15)
    assert proc.wait(timeout=60) != 0
    text = open(log).read()
    assert f"rank 1 (pid {rank1} on {socket.gethostname()}) died" in text, text[-3000:]
    assert "Traceback" not in text.split("died", 1)[0][-3000:]  # the survivor's own message, not a traceback
    assert not (out / "run.lock").exists()
    print(f"rank 0 gone {took:.1f} s after rank 1's SIGKILL")


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    proc, (rank0, rank1) = start_training(out, log)
    os.kill(rank1, signal.SIGTERM)  # rank 1 alone: rank 0 must not wait for it in a collective it skipped
    wait_gone([rank0, rank1], limit=60)
    proc.wait(timeout=60)
    text = open(log).read()
    assert "Stopped by SIGTERM; checkpoint saved" in text and "died" not in text, text[-3000:]
    ckpt = latest_checkpoint(str(out))
    assert ckpt.phase == "dense" and 20 <= ckpt.meta["step"] < 400 and not (out / "run.lock").exists()

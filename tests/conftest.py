"""Shared fixtures: tiny configs and batches of real (byte-level) token ids from generated stories; and the check
that the suite leaves no process running."""
import ctypes
import os
import signal
import time

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: the workers already fill the cores, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the runs the tests start
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch.set_num_threads(1)

from common.processes import process_alive
from config import ModelConfig
from data.synthetic import byte_token_batch, generate_stories
from tests.helpers import command_line, parents

TEXT = " ".join(generate_stories(200, seed=0))


def tokens_for(batch: int = 4, seq_len: int = 64, offset: int = 0) -> torch.Tensor:
    return byte_token_batch(TEXT[offset:], batch, seq_len)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=300, dim=32, n_layers=2, n_heads=4, max_seq_len=128)
    return ModelConfig(**(base | overrides))


@pytest.fixture
def tokens() -> torch.Tensor:
    return tokens_for()


@pytest.fixture
def offline(monkeypatch):
    """Never reach for the hub: the offline fallback (generated stories) is deterministic. Files that need it say
    pytestmark = pytest.mark.usefixtures("offline")."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def no_hub_switches(monkeypatch):
    """Neither offline switch set, whatever the environment says: the tests of the hub path stand in for the hub."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tokenizer():
    """A 300-token BPE tokenizer trained on generated stories (tests share it; none changes it)."""
    from data import train_tokenizer

    return train_tokenizer(generate_stories(300), 300)


@pytest.fixture(scope="module")
def model():
    """A tiny dense model (tiny_config, max_seq_len 32) at seed 0, in eval mode; a file may define its own."""
    from models import build_model

    torch.manual_seed(0)
    return build_model(tiny_config(max_seq_len=32)).eval()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one thread is faster, and two threads on a busy 2-core machine can be 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Processes that live as long as the interpreter that started them and end with it: not leaks.
IN_PROCESS_POOLS = ("torch._inductor.compile_worker", "multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _become_subreaper() -> bool:
    """Orphans of this process's children (torchrun's workers when a test kills torchrun) are re-parented here
    rather than to init, so the end-of-session check below sees them. Linux only."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process below pid, from /proc."""
    tree, found, frontier = parents(), {}, [pid]
    while frontier:
        p = frontier.pop()
        for child in (c for c, parent in tree.items() if parent == p and c not in found):
            found[child] = command_line(child)
            frontier.append(child)
    return {p: c for p, c in found.items() if process_alive(p)}


def leftover_processes(grace: float = float(os.environ.get("TESTS_LEFTOVER_GRACE_S", "15"))) -> dict[int, str]:
    """What this process started that is still running after `grace` seconds (exiting workers get that long)."""
    deadline = time.monotonic() + grace
    while True:
        left = {p: c for p, c in descendants(os.getpid()).items() if not any(k in c for k in IN_PROCESS_POOLS)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_running():
    """Fails the session (an error at its last test's teardown, under pytest -n too) naming every process the
    tests started that is still alive at the end, after killing it."""
    watching = os.path.isdir("/proc") and _become_subreaper()
    yield
    if not watching:
        return
    left = leftover_processes()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, os.WNOHANG)
        except (OSError, ChildProcessError):
            pass
    if left:
        names = "; ".join(f"pid {p}: {c[:160]}" for p, c in left.items())
        pytest.fail(f"{len(left)} process(es) started by the tests were still running at the end: {names}",
                    pytrace=False)

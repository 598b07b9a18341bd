"""Where and how the run executes: device, precision, and data parallelism under torchrun (NCCL on GPU, gloo on CPU):
DDP (a full replica per process) or FSDP2 (weights, gradients and AdamW sharded: training/parallel/sharding.py)."""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from common.processes import process_alive
from config import ConfigError


def resolve_precision(precision: str, device_type: str) -> str:
    """bf16 or fp32: "auto" is bf16 autocast on CUDA and fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision: str = "auto"  # RunConfig.precision; resolved for the device by .autocast_dtype
    parallel: str = "ddp"  # RunConfig.parallel: ddp (replicas) | fsdp (sharded); set for a run by use_parallel
    watch: "PeerWatch | None" = field(default=None, repr=False)  # under torchrun: the launcher and the other ranks
    # A gloo group beside the default one (NCCL on GPU) for host-side agreement: a flag reduced on it is a CPU
    # tensor, so reading it never waits for the GPU's queued work (the default group's would: a host sync).
    control: object | None = field(default=None, repr=False)
    timeout: timedelta = field(default_factory=lambda: DEFAULT_TIMEOUT)  # both groups' collective timeout

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether models are sharded over the processes (FSDP2), one process included (a mesh of one)."""
        return self.parallel == "fsdp"

    def use_parallel(self, parallel: str) -> None:
        """Train with RunConfig.parallel. fsdp in a single process shards over a mesh of one (a process group of
        one): the same code and numerics as on many, so a sharded run resumes on one process and back."""
        if parallel == "fsdp" and not hasattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard"):
            raise ConfigError(f"parallel=fsdp needs torch >= 2.6 (FSDP2's fully_shard) but this is torch "
                              f"{torch.__version__}: upgrade torch, or train with --parallel=ddp")
        self.parallel = parallel
        if parallel == "fsdp" and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 autocast (weights, gradients and optimizer stay fp32), or None for plain fp32."""
        return torch.bfloat16 if resolve_precision(self.precision, self.device.type) == "bf16" else None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """A scalar averaged over the processes (the global batch's loss from each process's), detached."""
        if not self.distributed:
            return t.detach()
        t = t.detach().float().clone()
        dist.all_reduce(t)
        return t / self.world_size

    def any(self, flag: torch.Tensor) -> bool:
        """Whether a bool tensor is true on any process: every process decides alike (a halt, say)."""
        if not self.distributed:
            return bool(flag.item())
        t = flag.to(torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's value of flag on every rank (e.g. whether a check passed). The other ranks wait here while rank 0
        prepares data or runs the checks: on the control group, so a wait past the timeout is CollectiveTimeout."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0])
        try:
            dist.broadcast(t, src=0, group=self.control)
        except RuntimeError as e:
            raise self.timed_out(e) from e
        return bool(t.item())

    def timed_out(self, e: BaseException) -> BaseException:
        """e as CollectiveTimeout when it is a collective's timeout (naming the timeout and the fix), else e."""
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            return e
        return CollectiveTimeout(
            f"rank {self.rank} waited {self.timeout.total_seconds():.0f} s, the process-group timeout, for the other "
            f"ranks (rank 0 preparing data, checking a transition or saving; training/parallel/runtime.py "
            f"collective_timeout says how it is derived); if rank 0 was still working, resume with "
            f"--collective_timeout=SECONDS above that")

    def stop_vote(self) -> "StopVote":
        """A fresh StopVote over this run's processes (the loop takes one per phase)."""
        if not self.distributed:
            return StopVote(None)
        return StopVote(self.control or dist.group.WORLD, self.timed_out)


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than the process group's timeout (message: how long, and the setting to raise)."""


class StopVote:
    """Whether any rank was signalled, agreed by every rank at the same step without a host-device sync.

    Each step, post() starts an all-reduce (MAX) of this rank's flag on the CPU control group without waiting for
    it, and returns the result of the previous step's vote, which has had a whole step to complete. So all ranks
    stop at the same step, one step after the signal was seen, and no GPU work is waited for (the old per-step
    all-reduce of a device tensor and its .item() drained the GPU's queue every step). finish() collects the last
    vote, so that every rank has taken part in the same number of collectives when the phase ends.
    """

    def __init__(self, group, timed_out=lambda e: e) -> None:
        self.group, self.timed_out, self._pending = group, timed_out, None  # (work, tensor) of the vote in flight

    def post(self, signalled: bool) -> bool:
        if self.group is None:
            return signalled
        if self.finish():
            return True  # the same result on every rank: all stop now, and no vote is left in flight
        flag = torch.tensor([1 if signalled else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return False

    def finish(self) -> bool:
        """Wait for the vote in flight; whether anyone was signalled when it was posted."""
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        try:
            work.wait()
        except RuntimeError as e:
            raise self.timed_out(e) from e
        return bool(flag.item())  # a CPU tensor: no device sync


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N as a device; ConfigError (one line) if it is unknown or not available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but torch.cuda.is_available() is False (a CPU build of torch, or no GPU "
                         "visible); use --device=cpu or --device=auto")
    return torch.device(name)


DEFAULT_TIMEOUT = timedelta(minutes=10)  # torch's NCCL default (gloo's is 30 min): collective_timeout's floor
PREPARE_BYTES_PER_S = 0.25e6  # rank 0 training a tokenizer and tokenizing text: 7x slower than 1.83 MB/s measured
CHECK_S_PER_PARAM_TOKEN = 1e-9  # the five float64 checks: 20x the 5e-11 s measured on 2 CPU threads
SAVE_BYTES_PER_S = 20e6  # a checkpoint written to a slow network filesystem


def collective_timeout(text_bytes: int, parameters: int, check_tokens: int, checkpoint_bytes: int) -> timedelta:
    """How long one collective may wait: twice the longest work that rank 0 does alone while the others wait in
    one, each bounded generously from the run's sizes, and never less than torch's 10 minutes:

        prepare = text_bytes / PREPARE_BYTES_PER_S           (tokenizer and token cache from text; 0 when prepared)
        checks  = CHECK_S_PER_PARAM_TOKEN x parameters x check_tokens   (the largest grown model, its calibration)
        save    = checkpoint_bytes / SAVE_BYTES_PER_S        (weights and AdamW state, written by rank 0)
        timeout = max(10 min, 2 x max(prepare, checks, save))

    Measured: bench/tokenize_rate.py (1.83 MB/s a worker), bench/verify_cost.py (all five checks 15.4 s at 151M
    parameters on 8 x 256 tokens, 2 CPU threads). The full 1.9 GB TinyStories from text gives 4.2 hours; a prepared
    dataset (prepare_data.py) and the micro or cpu preset, the 10-minute floor. A longer timeout costs nothing
    when a rank dies (PeerWatch stops the others within seconds); only a true hang waits it out."""
    longest = max(text_bytes / PREPARE_BYTES_PER_S, CHECK_S_PER_PARAM_TOKEN * parameters * check_tokens,
                  checkpoint_bytes / SAVE_BYTES_PER_S)
    return max(DEFAULT_TIMEOUT, timedelta(seconds=round(2 * longest)))


def setup_runtime(device: str = "auto", precision: str = "auto", timeout: timedelta = DEFAULT_TIMEOUT) -> Runtime:
    """Pick the device; under torchrun (RANK/WORLD_SIZE set) join the process group (timeout: collective_timeout)
    and the gloo control group beside it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and world_size > 1:
        dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    watch = control = None
    if world_size > 1 and not dist.is_initialized():
        launcher = os.getppid()  # before anything can reparent this process
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout)
        watch = PeerWatch.join(rank, world_size, launcher)
    return Runtime(dev, rank, world_size, local_rank, precision, watch=watch, control=control, timeout=timeout)


def teardown_runtime(rt: Runtime) -> None:
    if rt.watch is not None:
        rt.watch.leave()
    if (rt.distributed or rt.sharded) and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Peer:
    rank: int
    host: str
    pid: int

    def __str__(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host})"


@dataclass
class PeerWatch:
    """What a torchrun worker cannot see from inside a collective, watched from a daemon thread every `interval`.

    The launcher's death (this process reparented, or its store gone) sends this process SIGTERM once: the path a
    signal already takes (every rank stops at the same step, saves, exits 143, the lock is released). Another rank's
    death is found at once on this host (its pid) and within `silence` seconds on another (its heartbeat in the
    launcher's store stops); on_peer_death is then called with a line naming it, since no collective with it can
    complete: without this the survivors would wait out the process group's timeout (collective_timeout).
    """

    me: Peer
    peers: list[Peer]
    launcher: int
    store: object | None = None  # a TCPStore client of the launcher's store, for heartbeats across hosts
    key: str = "growth_verified/alive"
    interval: float = 1.0
    silence: float = 15.0
    on_peer_death: Callable[[str], None] = field(default=lambda line: None, repr=False)
    _seen: dict = field(default_factory=dict, repr=False)  # rank -> (heartbeat count, when it last changed)
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)
    _deciding: threading.Lock = field(default_factory=threading.Lock, repr=False)  # stop() vs a verdict
    _signalled: bool = False

    @classmethod
    def join(cls, rank: int, world_size: int, launcher: int) -> "PeerWatch":
        """Every rank's host and pid (a collective: all ranks call it), and a heartbeat where the store is reachable."""
        me = Peer(rank, socket.gethostname(), os.getpid())
        table: list = [None] * world_size
        dist.all_gather_object(table, (me.host, me.pid))
        peers = [Peer(r, host, pid) for r, (host, pid) in enumerate(table) if r != rank]
        watch = cls(me, peers, launcher, store=_store_client(),
                    key=f"growth_verified/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
                        f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/alive")
        threading.Thread(target=watch._run, name="peer-watch", daemon=True).start()
        return watch

    def stop(self) -> None:
        with self._deciding:
            self._stopped.set()

    def leave(self) -> None:
        """Wait, still watched, until every rank is leaving too, then stop watching: a rank that has finished its
        work exits, and that is no death."""
        try:
            dist.barrier()
        except Exception:  # a dead peer: the watch has said so, or will
            pass
        self.stop()

    def dead_peers(self, wait: float = 0.0) -> list[Peer]:
        """The other ranks known to have died (on this host: their pid; elsewhere: a silent heartbeat); polls up to
        `wait` seconds, for a peer whose sockets have closed but which has not finished exiting."""
        deadline = time.monotonic() + wait
        while True:
            dead = [p for p in self.peers if p.host == self.me.host and not process_alive(p.pid)]
            dead += [p for p in self.peers if p.host != self.me.host and self._silent(p)]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.1)

    def _silent(self, peer: Peer) -> bool:
        count, since = self._seen.get(peer.rank, (None, time.monotonic()))
        return count is not None and time.monotonic() - since > self.silence

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            if os.getppid() != self.launcher or not self._beat():
                self._launcher_gone()
            with self._deciding:
                dead = [] if self._stopped.is_set() else self.dead_peers()
                if dead:
                    self.on_peer_death(f"{', '.join(map(str, dead))} died: rank {self.me.rank} stops too, since no "
                                       "collective with it can complete")
                    return

    def _beat(self) -> bool:
        """Count this rank's heartbeat and read the others'; False if the store is gone (the launcher died)."""
        if self.store is None:
            return True
        try:
            self.store.add(f"{self.key}/{self.me.rank}", 1)
            for p in self.peers:
                if p.host != self.me.host:
                    count = self.store.add(f"{self.key}/{p.rank}", 0)
                    if self._seen.get(p.rank, (None,))[0] != count:
                        self._seen[p.rank] = (count, time.monotonic())
        except Exception:  # the store's errors are plain RuntimeErrors and socket errors, by version
            self.store = None
            return False
        return True

    def _launcher_gone(self) -> None:
        if not self._signalled:
            self._signalled = True
            print(f"rank {self.me.rank}: the launcher (pid {self.launcher}) is gone: stopping as on SIGTERM",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)


def _store_client():
    """A client of the store torchrun's launcher serves (MASTER_ADDR:MASTER_PORT), or None where there is none."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    try:
        return dist.TCPStore(os.environ.get("MASTER_ADDR", "localhost"), int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False)
    except Exception:  # no heartbeat across hosts; this host's ranks are still watched by pid
        return None


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the training loop reads between steps (it then saves and stops).

    A second signal stops the process at once (exit 130 / 143) after printing `at_once`: checkpoints are
    written aside and renamed, so the last complete one stays whole, and the next start clears the rest.
    """

    def __init__(self, at_once: str = ""):
        self.received: str | None = None
        self.at_once = at_once

    def __enter__(self) -> "StopSignals":
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.received:
            os.write(2, f"\nStopped at once by a second {signal.Signals(signum).name}. {self.at_once}\n".encode())
            os._exit(130 if signum == signal.SIGINT else 143)
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

"""Where and how the run executes: device, precision, and data parallelism under torchrun (NCCL on GPU, gloo on CPU):
DDP (a full replica per process) or FSDP2 (weights, gradients and AdamW sharded: training/sharding.py)."""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
            from config import ConfigError

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
        """Rank 0's value of flag on every rank (e.g. whether a check passed)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(t, src=0)
        return bool(t.item())


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Pick the device; under torchrun (RANK/WORLD_SIZE set) join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch.cuda.is_available() is False; use --device=cpu")
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world_size, local_rank, precision)


def teardown_runtime(rt: Runtime) -> None:
    if (rt.distributed or rt.sharded) and dist.is_initialized():
        dist.destroy_process_group()


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

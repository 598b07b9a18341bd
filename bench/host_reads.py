"""Host reads of tensor data per training step (what would be host-device syncs on a GPU) and the step time, on CPU.

    python bench/host_reads.py            # 1 process: dense fp32, MoE bf16; then 2 processes (DDP over gloo)
    python bench/host_reads.py --quick    # 1 process only

HostReads counts every scalar read (.item(), bool(), float(), int(): aten._local_scalar_dense), every operator whose
output size depends on the data (nonzero, bincount, ...), and Python's .tolist(), .numpy() and .cpu() calls, each
with the first frame of the project's code that asked. A phase that logs, evaluates and saves only at its last step
is run for 3 and for 6 steps: the difference / 3 is what an ordinary step reads. On CPU every tensor is a host
tensor, so a read of a CPU-only tensor (the stop vote's, runtime.StopVote) counts as well: where says which.
The step time is the loop's own ms/step (training.loop._throughput) over the micro preset's shapes, median of the
log lines after the first; on a shared machine it moves by 2x (FACTS.md), so compare only runs made side by side.
The script uses only the loop's public API, so it also measures an older checkout: copy it there and run it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Operators that make a CUDA host wait for the GPU: a scalar read and the ops whose output size depends on the data.
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
            "aten.bincount", "aten.repeat_interleave.Tensor")


class HostReads(TorchDispatchMode):
    """Counts the host's reads of tensor data, each with the first frame of the project's own code that asked for it
    ("training/loop.py:train_phase"); .tolist(), .numpy() and .cpu() where Python calls them."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(SYNC_OPS):
            self._record()
        return func(*args, **(kwargs or {}))

    def _record(self) -> None:
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = os.path.relpath(frame.filename, ROOT)
            if not path.startswith(("..", ".venv")) and "site-packages" not in path:
                self.where.append(f"{path}:{frame.name}")
                return
        self.where.append("torch")

    def __enter__(self):
        self._patched = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}
        for name, real in self._patched.items():
            setattr(torch.Tensor, name, self._counting(real))
        return super().__enter__()

    def __exit__(self, *exc):
        for name in self._patched:
            delattr(torch.Tensor, name)  # the C methods of torch._C.TensorBase show through again
        return super().__exit__(*exc)

    def _counting(self, real):
        def call(t, *args, **kwargs):
            self._record()
            return real(t, *args, **kwargs)
        return call


class _Log:
    def __init__(self):
        self.records = []

    def write(self, **r):
        self.records.append(r)


def micro_phase(rt, n_experts: int, steps: int, log_interval: int, impl: str = "auto", accum: int = 1,
                reads: bool = False) -> tuple[list[str], list[float]]:
    """A phase of the micro preset's model (dense or n_experts) on generated text: (host reads if asked, the logged
    ms/step). It evaluates and saves only at its last step."""
    from dataclasses import replace

    from data.synthetic import byte_token_batch, generate_stories
    from data.tokens import StepBatches
    from models import build_model
    from models.moe import set_expert_impl
    from training.loop import Phase, PhaseRun, train_phase
    from training.settings import build_settings

    s = build_settings("micro")
    cfg = replace(s.model, n_experts=n_experts, top_k=2 if n_experts else s.model.top_k)
    tc = replace(s.train, log_interval=log_interval, eval_interval=steps, checkpoint_interval=steps, eval_batches=1,
                 grad_accum_steps=accum, warmup_steps=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    if n_experts:
        set_expert_impl(model, impl)
    tokens = (byte_token_batch(" ".join(generate_stories(300, seed=0)), 1, 60_000) % cfg.vocab_size)
    tokens = tokens.flatten().numpy().astype("uint16")
    batches = StepBatches(tokens, tc.batch_size, tc.seq_len, 0, rt.rank, rt.world_size, accum)
    val = [(torch.from_numpy(tokens[:tc.seq_len * 2].astype("int64")).view(2, -1)[:, :-1],
            torch.from_numpy(tokens[1:tc.seq_len * 2 + 1].astype("int64")).view(2, -1)[:, :-1])]
    run = PhaseRun(rt, tc, batches, val, _Log(), save=lambda *a: None)
    counter = HostReads()
    if reads:
        counter.__enter__()
    try:
        train_phase(model, Phase("moe" if n_experts else "dense", "", steps, 1e-3), run)
    finally:
        if reads:
            counter.__exit__(None, None, None)
    return counter.where, [r["ms_per_step"] for r in run.log.records if r["kind"] == "train"]


def reads_per_step(rt, n_experts: int, impl: str = "auto", accum: int = 1) -> dict:
    """Host reads of an ordinary step, and where they come from (a 6-step phase minus a 3-step one, / 3)."""
    short, long = (micro_phase(rt, n_experts, n, n, impl, accum, reads=True)[0] for n in (3, 6))
    extra = list(long)
    for w in short:
        if w in extra:
            extra.remove(w)
    return {"per_step": (len(long) - len(short)) / 3, "where": sorted(set(extra)), "last_step": len(short)}


def step_ms(rt, n_experts: int, impl: str = "auto", steps: int = 60) -> float:
    """Median logged ms/step over a phase, logging every 10 steps, the first line (warm-up) left out."""
    return statistics.median(micro_phase(rt, n_experts, steps, 10, impl)[1][1:])


CASES = {"dense fp32": (0, "auto", "fp32"), "MoE fp32 (loop experts)": (4, "loop", "fp32"),
         "MoE bf16 (grouped_mm experts)": (4, "grouped_mm", "bf16")}


def measure(rt_for) -> dict:
    out = {}
    for name, (n_experts, impl, precision) in CASES.items():
        rt = rt_for(precision)
        out[name] = {**reads_per_step(rt, n_experts, impl), "ms_per_step": step_ms(rt, n_experts, impl)}
    return out


def worker(path: str) -> None:
    """One torchrun worker: the same measurements on this rank, written to path.RANK."""
    from training.parallel.runtime import setup_runtime, teardown_runtime

    rt = setup_runtime("cpu", "fp32")
    result = measure(lambda precision: (setattr(rt, "precision", precision), rt)[1])
    json.dump(result, open(f"{path}.{rt.rank}", "w"))
    teardown_runtime(rt)


def show(title: str, result: dict) -> None:
    print(title)
    for name, r in result.items():
        print(f"  {name:32s} {r['per_step']:.2f} reads/step {r['where'] or ''}   last step {r['last_step']} reads   "
              f"{r['ms_per_step']:.1f} ms/step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one process only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        return worker(args.worker)
    from training.parallel.runtime import Runtime

    show("1 process", measure(lambda precision: Runtime(torch.device("cpu"), precision=precision)))
    if args.quick:
        return
    path = f"/tmp/host_reads-{os.getpid()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    os.path.abspath(__file__), "--worker", path], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    for rank in (0, 1):
        show(f"2 processes (DDP, gloo), rank {rank}", json.load(open(f"{path}.{rank}")))
        os.remove(f"{path}.{rank}")


if __name__ == "__main__":
    main()

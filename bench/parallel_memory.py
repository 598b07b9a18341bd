"""Per-process memory and step time, DDP against FSDP (RunConfig.parallel), on 2 CPU processes (gloo).

    python bench/parallel_memory.py                    # micro and cpu preset shapes, about 5 minutes on 2 cores
    python bench/parallel_memory.py --quick            # micro only
    python bench/parallel_memory.py --nproc 4          # more processes (as many cores as processes, ideally)

For the dense (phase 1) and grown MoE (phase 3) model of each preset, at its batch_size x seq_len per process,
each process trains a few steps through training.loop.train_phase, and records: the bytes it holds of parameters,
gradients and AdamW state (training.parallel.sharding.resident_bytes: the local shards under FSDP), the peak bytes torch's
CPU allocator had allocated during the steps (bench/memory_model.py's PeakMeter: the profiler's allocation
timeline plus the weights live before, the quantity torch.cuda.max_memory_allocated gives on a GPU), the plan's
step peak for the same settings (training.plan.step_memory), and the median time of a step after the first.
One more case accumulates 2 micro-batches under FSDP both ways: reducing every micro-batch (what the loop does) and
FSDP2's set_requires_gradient_sync(False) on the first (DDP's no_sync analogue), to show what the latter holds.
Writes bench/results/parallel_memory.json (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.memory_model import PeakMeter  # noqa: E402
from training.stages import stage_configs  # noqa: E402
from training.plan import step_memory  # noqa: E402
from training.settings import build_settings  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "parallel_memory.json")


class _Log:
    def __init__(self):
        self.records = []

    def write(self, **record) -> None:
        self.records.append(record)


def cases(quick: bool) -> list[tuple[str, object, object]]:
    """(name, model config, train config): dense and grown MoE of the micro and cpu presets, then accumulation."""
    out = []
    for preset in ("micro",) if quick else ("micro", "cpu"):
        s = build_settings(preset)
        tc = replace(s.train, warmup_steps=1, log_interval=1, eval_interval=10**6, checkpoint_interval=10**6)
        configs = stage_configs(s)
        out += [(f"{preset} dense", configs[0], tc), (f"{preset} grown MoE", configs[2], tc)]
    s = build_settings("micro")
    tc = replace(s.train, batch_size=4, grad_accum_steps=2, warmup_steps=1, log_interval=1, eval_interval=10**6,
                 checkpoint_interval=10**6)
    return out + [("micro grown MoE, 2 micro-batches", stage_configs(s)[2], tc)]


def _no_sync_accumulation(net, run, k):
    """The loop's accumulation with FSDP2's no_sync analogue: gradients reduce-scattered at the last micro-batch only,
    held whole (unsharded) on every process until then."""
    from training.loop import lm_loss

    for micro in range(k):
        net.set_requires_gradient_sync(micro == k - 1)
        x, y = run.batches.next()
        loss, total = lm_loss(net, x, y, run.train)
        (total / k).backward()
    return loss.detach(), total.detach(), None


def measure(name: str, cfg, tc, parallel: str, steps: int, rt, variant: str = "") -> dict:
    """One process's figures for training cfg under parallel (rt already joined to the group)."""
    from data.tokens import eval_batches
    from models import build_model
    from training import loop
    from training.loop import Phase, PhaseRun, lm_loss, train_phase
    from data.tokens import StepBatches
    from training.parallel.sharding import resident_bytes, sharded_from

    rt.use_parallel(parallel)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 200_000).astype(np.uint16)
    batches = StepBatches(tokens, tc.batch_size, tc.seq_len, 0, rt.rank, rt.world_size, tc.grad_accum_steps)
    torch.manual_seed(0)
    model = sharded_from(build_model(cfg) if rt.is_master else None, rt) if parallel == "fsdp" else build_model(cfg)
    held_before = resident_bytes(model)["parameters"]
    optimizer = []
    tc = replace(tc, checkpoint_interval=steps)  # "saves" (captures the optimizer) after the last step
    val = eval_batches(tokens, tc.batch_size, tc.seq_len, 1)  # the phase's closing eval, one batch
    run = PhaseRun(rt, tc, batches, val, _Log(), save=lambda m, opt, st: optimizer.append(opt))
    accumulate = loop.accumulate_gradients
    loop.accumulate_gradients = _no_sync_accumulation if variant == "no_sync" else accumulate
    try:
        started = time.perf_counter()
        with PeakMeter(rt.device, base=held_before) as meter, contextlib.redirect_stdout(io.StringIO()):
            train_phase(model, Phase("dense", "bench", steps, 1e-3, decays=False), run)
        seconds = time.perf_counter() - started
    finally:
        loop.accumulate_gradients = accumulate
    x, y = batches.next()
    lm_loss(model, x, y, tc)[1].backward()  # gradients as a step holds them (the loop frees its own)
    held = resident_bytes(model, optimizer[0])
    step_ms = [r["ms_per_step"] for r in run.log.records if r["kind"] == "train"][1:]
    terms, plan_peak, _ = step_memory(cfg, tc, "fp32", rt.world_size, parallel)
    return {"case": name, "parallel": parallel + (f" ({variant})" if variant else ""), "rank": rt.rank,
            **{f"{k}_bytes": v for k, v in held.items()}, "held_bytes": sum(held.values()),
            "peak_bytes": meter.peak, "plan_step_peak_bytes": plan_peak, "plan_held_bytes":
            terms["weights"] + terms["gradients"] + terms["AdamW"], "step_ms": statistics.median(step_ms),
            "seconds": seconds}


def worker(out: str, steps: int, quick: bool) -> None:
    import torch.distributed as dist

    from training.parallel.runtime import setup_runtime, teardown_runtime

    rt, rows = setup_runtime("cpu", "fp32"), []
    for name, cfg, tc in cases(quick):
        modes = [("ddp", ""), ("fsdp", "")] if tc.grad_accum_steps == 1 else [("fsdp", ""), ("fsdp", "no_sync")]
        for parallel, variant in modes:
            mine = measure(name, cfg, tc, parallel, steps, rt, variant)
            every = [None] * rt.world_size
            dist.all_gather_object(every, mine)
            rows += every
            if rt.is_master:
                print(f"{name:<36} {mine['parallel']:<15} held {mine['held_bytes'] / 2**20:7.2f} MiB  peak "
                      f"{mine['peak_bytes'] / 2**20:7.2f} MiB  {mine['step_ms']:7.0f} ms/step", flush=True)
    if rt.is_master:
        json.dump(rows, open(out, "w"))
    teardown_runtime(rt)


def summarise(rows: list[dict], nproc: int, steps: int) -> dict:
    """Per case: each mode's figures on rank 0 (the ranks differ by a few padded rows), and FSDP's over DDP's."""
    table = {}
    for r in rows:
        if r["rank"] == 0:
            table.setdefault(r["case"], {})[r["parallel"]] = {k: v for k, v in r.items() if k not in ("case", "rank")}
    for modes in table.values():
        if "ddp" in modes:
            ddp, fsdp = modes["ddp"], modes["fsdp"]
            modes["fsdp / ddp"] = {k: round(fsdp[k] / ddp[k], 4) for k in
                                   ("parameters_bytes", "gradients_bytes", "optimizer_bytes", "held_bytes",
                                    "peak_bytes", "step_ms")}
    return {"processes": nproc, "backend": "gloo", "device": "cpu", "threads_per_process": 1, "steps": steps,
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M"),
            "measured": "held: parameters + gradients + AdamW state this process holds (its shards under FSDP); peak: "
                        "torch's CPU allocator over the steps (profiler timeline + weights before); step_ms: median "
                        "after the first step", "cases": table, "rows": rows}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per case (the first is not timed)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the micro preset only")
    p.add_argument("--port", type=int, default=29571)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.quick)
        return 0
    part = args.out + ".rows"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={args.port}", "-m", "bench.parallel_memory", "--worker", part, "--steps", str(args.steps)]
    cmd += ["--quick"] if args.quick else []
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
        return 1
    result = summarise(json.load(open(part)), args.nproc, args.steps)
    os.remove(part)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(result, open(args.out, "w"), indent=1)
    for case, modes in result["cases"].items():
        if "fsdp / ddp" in modes:
            print(f"{case:<36} FSDP / DDP per process: held {modes['fsdp / ddp']['held_bytes']:.3f}, peak "
                  f"{modes['fsdp / ddp']['peak_bytes']:.3f}, step time {modes['fsdp / ddp']['step_ms']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

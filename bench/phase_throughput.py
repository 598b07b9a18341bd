"""Training throughput, MFU and peak memory of each pipeline phase at a preset's shapes, with no data.

    python bench/phase_throughput.py --preset cuda --compile=true --precision=bf16 --steps 300
    python bench/phase_throughput.py --preset micro --device cpu --steps 2 --warmup 1      # a smoke test

Each stage's model is built from training.stages.stage_configs (random init) and trained on random tokens
with the training loop's own pieces: accumulate_gradients (lm_loss under the runtime's autocast, gradient
accumulation, activation checkpointing), the loop's compile wrapper, gradient clipping and make_optimizer's
AdamW. Warm-up steps (compilation included) are not timed. MFU is model FLOPs (Transformer.flops_per_token)
per second over training.costs.peak_flops for the GPU and precision; peak memory is
torch.cuda.max_memory_allocated over the phase (weights, gradients, AdamW state, activations), set against
training.plan.make_plan's training-step peak for that phase (an eager-mode model: a compiled step may use
less). Figures, not assertions. Writes one JSON file (--out), rewritten after every phase so a time limit
keeps the phases already measured.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError, ModelConfig  # noqa: E402
from models import build_model  # noqa: E402
from training.loop import PhaseRun, accumulate_gradients, wrap_for_training, lr_at, make_optimizer  # noqa: E402
from training.stages import PIPELINE, stage_configs  # noqa: E402
from training.parallel.runtime import Runtime, resolve_precision, setup_runtime  # noqa: E402
from training.settings import Settings, build_settings, make_parser, parse_command_line  # noqa: E402

DENSE_GOAL, MOE_GOAL = 0.45, 0.35  # MFU goals in bf16 (issue 11) of a dense and an MoE step, compared in the summary
GIB = 1 << 30


class RandomTokens:
    """The batches object the loop reads: uniform random (x, y) made on the device (no data, no copies)."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, device: torch.device, seed: int):
        self.shape, self.vocab_size, self.device = (batch_size, seq_len + 1), vocab_size, device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.vocab_size, self.shape, device=self.device, generator=self.generator)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {}


class _NoLog:
    def write(self, **record) -> None:
        pass


@dataclass
class Target:
    """What the figures are measured against: the device's peak FLOP/s and the plan's memory per phase."""

    peak_flops: float | None
    planned: dict[str, dict]  # phase name -> the plan's memory fields of the record (empty when no plan)
    plan_note: str  # "ok", or why there is no plan


def gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def targets(s: Settings, rt: Runtime) -> Target:
    """training.plan's peak FLOP/s and per-phase memory; a missing or failing plan leaves them unknown."""
    precision = resolve_precision(s.run.precision, rt.device.type)
    try:
        from training.costs import peak_flops
        from training.plan import make_plan
    except ImportError as e:
        return Target(None, {}, f"training.plan unavailable: {e}")
    name = gpu_name(rt.device)
    try:
        peak = peak_flops(name, precision) if name else None
        plan = make_plan(s, device_type=rt.device.type, gpu_name=name, world_size=1)
    except Exception as e:  # a plan that cannot be made must not cost the measurement
        return Target(None, {}, f"training.plan failed: {type(e).__name__}: {e}")
    return Target(peak, {ph.name: planned_memory(ph) for ph in plan.phases}, "ok")


def planned_memory(phase) -> dict:
    """A PhasePlan's memory: the training step's peak (what this script measures) and the phase's (with its
    transition checks and evals, which this script does not run)."""
    m = phase.memory
    return {"planned_mfu": phase.mfu, "planned_mfu_source": phase.mfu_source,
            "planned_step_peak_bytes": m.step_peak, "planned_step_moment": m.step_moment,
            "planned_phase_peak_bytes": phase.peak_bytes, "planned_phase_peak_at": m.where}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free the last phase's model and optimizer so the next phase's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_steps(net: torch.nn.Module, opt: torch.optim.Optimizer, run: PhaseRun, lr: float, steps: range,
                total: int) -> torch.Tensor:
    """The loop's optimizer steps (lr schedule, accumulated micro-batches, clipping, AdamW); their losses."""
    tc = run.train
    losses = []
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, tc)
        loss, _, _ = accumulate_gradients(net, run, tc.grad_accum_steps)
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)  # a compiled net's are the model's
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
    return torch.stack(losses) if losses else torch.zeros(0, device=run.rt.device)  # read once, at the end


def measure_phase(cfg: ModelConfig, name: str, s: Settings, rt: Runtime, steps: int, warmup: int,
                  target: Target) -> dict:
    """One phase's figures: warm-up steps untimed, then `steps` timed optimizer steps."""
    tc, device = s.train, rt.device
    release(device)
    torch.manual_seed(s.run.seed)
    model = build_model(cfg).to(device)
    model.activation_checkpointing = tc.activation_checkpointing
    run = PhaseRun(rt, tc, RandomTokens(cfg.vocab_size, tc.batch_size, tc.seq_len, device, s.run.seed), [],
                   _NoLog(), compile=s.run.compile)
    net, opt, lr, total = wrap_for_training(model, run), make_optimizer(model, lr_of(name, s), tc), lr_of(name, s), warmup + steps
    first = train_steps(net, opt, run, lr, range(warmup), total)
    sync(device)
    start = time.perf_counter()
    timed = train_steps(net, opt, run, lr, range(warmup, total), total)
    sync(device)
    seconds = time.perf_counter() - start
    losses = torch.cat([first, timed]).float().cpu()
    record = figures(model, name, s, steps, seconds, target)
    record.update(warmup_steps=warmup, loss_first=losses[0].item(), loss_last=losses[-1].item(),
                  loss_finite=bool(torch.isfinite(losses).all()), **memory(device, target.planned.get(name, {})))
    del model, net, opt, run
    return record


def lr_of(name: str, s: Settings) -> float:
    return getattr(s.train, f"{name}_lr")


def figures(model, name: str, s: Settings, steps: int, seconds: float, target: Target) -> dict:
    """Shapes, speed and MFU (as training.loop reports them) of `steps` steps in `seconds`."""
    cfg, tc = model.config, s.train
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum_steps
    flops_per_step = model.flops_per_token(tc.seq_len) * tokens_per_step
    flops_per_s = steps * flops_per_step / seconds
    return {"phase": name, "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_experts": cfg.n_experts, "top_k": cfg.top_k if cfg.is_moe else None,
            "params": model.num_parameters(), "active_params": model.num_parameters(active=True),
            "batch_size": tc.batch_size, "seq_len": tc.seq_len, "grad_accum_steps": tc.grad_accum_steps,
            "tokens_per_step": tokens_per_step, "flops_per_token": model.flops_per_token(tc.seq_len),
            "steps": steps, "seconds": seconds, "ms_per_step": 1000 * seconds / steps,
            "tokens_per_s": steps * tokens_per_step / seconds, "flops_per_s": flops_per_s,
            "mfu": flops_per_s / target.peak_flops if target.peak_flops else None, "mfu_goal": MOE_GOAL if cfg.is_moe else DENSE_GOAL}


def memory(device: torch.device, planned: dict) -> dict:
    """Measured peak (CUDA only: the caching allocator's high-water mark since the phase began) against the
    plan's training-step peak (the plan models eager mode: a compiled step may differ)."""
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    step = planned.get("planned_step_peak_bytes")
    return {"peak_memory_bytes": measured, **planned, "memory_ratio": measured / step if measured and step else None}


def line(r: dict) -> str:
    """One printed line per phase: figures only, the MFU goal beside the MFU."""
    if "error" in r:
        return f"{r['phase']:<6} error: {r['error']}"
    parts = [f"{r['phase']:<6} dim {r['dim']} x {r['n_layers']} layers", f"{r['ms_per_step']:8.1f} ms/step",
             f"{r['tokens_per_s']:>10,.0f} tok/s", f"{flops(r['flops_per_s'])}/s"]
    if r["mfu"] is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}% (goal {100 * r['mfu_goal']:.0f}% in bf16)")
    if r["peak_memory_bytes"] is not None:
        plan = (f" / plan {r['planned_step_peak_bytes'] / GIB:.2f} GiB = {r['memory_ratio']:.2f}"
                if r["memory_ratio"] else "")
        parts.append(f"peak {r['peak_memory_bytes'] / GIB:.2f} GiB{plan}")
    return " | ".join(parts)


def flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x / 1e6:.1f} MFLOP"


def header(s: Settings, rt: Runtime, preset: str, target: Target) -> dict:
    """The run's conditions, the top of the JSON."""
    return {"script": "bench/phase_throughput.py", "preset": preset, "device": str(rt.device),
            "gpu_name": gpu_name(rt.device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "precision": resolve_precision(s.run.precision, rt.device.type), "compile": s.run.compile,
            "activation_checkpointing": s.train.activation_checkpointing, "peak_flops": target.peak_flops,
            "plan": target.plan_note, "threads": torch.get_num_threads(), "phases": []}


def write(result: dict, path: str) -> None:
    """Atomic: a reader (or a killed run) never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def parse(argv: list[str]):
    p = make_parser(__doc__.split("\n")[0], epilog="Settings (--device, --compile, --precision, --batch_size, "
                    "--grad_accum_steps, --activation_checkpointing, ...) apply on top of the preset.")
    p.add_argument("--preset", default="cuda", help="preset whose shapes are measured (default cuda)")
    p.add_argument("--steps", type=int, default=200, help="timed optimizer steps per phase (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first, compilation included (default 10)")
    p.add_argument("--phases", nargs="+", default=[st.name for st in PIPELINE], help="phases to measure")
    p.add_argument("--out", default=os.path.join("bench", "results", "phase_throughput.json"), help="JSON file")
    a, overrides = parse_command_line(p, argv)
    unknown = set(a.phases) - {st.name for st in PIPELINE}
    if unknown or a.steps < 1 or a.warmup < 0:
        raise ConfigError(f"--phases must name {', '.join(st.name for st in PIPELINE)}; --steps >= 1, --warmup >= 0")
    return a, build_settings(a.preset, overrides)


def main(argv: list[str]) -> int:
    try:
        a, s = parse(argv)
        rt = setup_runtime(s.run.device, s.run.precision)
    except (ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = targets(s, rt)
    result = header(s, rt, a.preset, target)
    print(f"{rt.device} {result['gpu_name'] or ''} torch {torch.__version__}, {result['precision']}, "
          f"compile {s.run.compile}; peak {flops(target.peak_flops) + '/s' if target.peak_flops else 'unknown'}; "
          f"plan: {target.plan_note}")
    failed = False
    for stage, cfg in zip(PIPELINE, stage_configs(s)):
        if stage.name not in a.phases:
            continue
        try:
            record = measure_phase(cfg, stage.name, s, rt, a.steps, a.warmup, target)
        except Exception as e:  # an OOM or compile failure in one phase leaves the others measurable
            record, failed = {"phase": stage.name, "error": f"{type(e).__name__}: {str(e)[:500]}"}, True
        result["phases"].append(record)
        print(line(record), flush=True)
        write(result, a.out)
    print(f"wrote {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""training/plan.py's memory model against measurement: the peak of real training steps, transitions and the
clone-divergence eval, term by term where a term can be seen on its own.

    OMP_NUM_THREADS=1 python bench/memory_model.py              # CPU, about 4 minutes on one quiet core
    python bench/memory_model.py --device=cuda --out-dir=DIR    # on a GPU (bench/gpu_check.sh); exit 3 without one
    python bench/memory_model.py --quick                        # the micro cases only

How it measures. A training step is training.loop.train_phase itself, two optimizer steps (the second has
AdamW's state; the last ends with its eval) on random tokens; a transition is training.transition.transition on a
pair grown by the pipeline from a fresh model. On CPU, torch.profiler(profile_memory=True) records every
allocation and free of torch's CPU allocator with its size, in order: the running sum over that timeline plus
what was live before (the weights) is the peak. That is the quantity the plan models and the same one
torch.cuda.max_memory_allocated reports on a GPU; the process's RSS is not (it keeps freed pages, Python's heap
and library code), so RSS is not used. The activations autograd saves are also counted directly: a
saved_tensors_hooks pack hook records every distinct storage saved during the forward (weights excluded, the
autocast bf16 weight copies included). Writes memory_model.json (memory_model_cuda.json on a GPU) to --out-dir
(default bench/results) after every case, so a run stopped by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import types
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ModelConfig, TrainConfig  # noqa: E402
from data.tokens import TokenBatches  # noqa: E402
from models import build_model  # noqa: E402
from training.loop import Phase, PhaseRun, lm_loss, train_phase  # noqa: E402
from training.transition import transition  # noqa: E402
from training.stages import PIPELINE, stage_configs  # noqa: E402
from training.costs import parameter_count  # noqa: E402
from training.plan import (WIDTHS, autocast_weights, block_saved_bytes, clone_divergence_bytes,  # noqa: E402
                           eval_memory, head_saved_bytes, step_memory, transition_memory)
from training.parallel.runtime import Runtime  # noqa: E402
from training.settings import build_settings  # noqa: E402
from transfer import measure_clone_divergence  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class _NoLog:
    def write(self, **record) -> None:
        pass


# ------------------------------------------------------------------------------------------ measuring
class PeakMeter:
    """Peak bytes allocated by torch inside a `with` block, above what was live at its start, plus `base`."""

    def __init__(self, device: torch.device, base: int = 0):
        self.device, self.base, self.peak = device, base, 0

    def __enter__(self) -> "PeakMeter":
        if self.device.type == "cuda":
            for dtype in (torch.float32, torch.bfloat16):  # cuBLAS allocates its workspace at the first matmul:
                a = torch.ones(64, 64, device=self.device, dtype=dtype)  # once per process, not the plan's
                a @ a
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start + self.base
            return
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        live = high = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            high = max(high, live)
        self.peak = high + self.base


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, tc: TrainConfig, rt: Runtime) -> int:
    """Bytes of the distinct storages autograd saves in one forward of the training objective (not the weights)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rt.autocast():
        loss, total = lm_loss(model, x, y, tc)
    del loss, total
    return sum(seen.values())


def _batches(vocab: int, tc: TrainConfig) -> TokenBatches:
    tokens = np.random.default_rng(0).integers(0, vocab, 50_000).astype(np.uint16)
    return TokenBatches(tokens, tc.batch_size, tc.seq_len, seed=0)


def measure_step(cfg: ModelConfig, tc: TrainConfig, precision: str, device: torch.device) -> dict:
    """Peak of train_phase over two optimizer steps and its final eval; saved activations of one forward."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    rt = Runtime(device, precision=precision)
    batches = _batches(cfg.vocab_size, tc)
    x, y = batches.next()
    model.activation_checkpointing = False  # count what a plain forward saves
    saved = saved_bytes(model, x.to(device), y.to(device), tc, rt)
    run = PhaseRun(rt, tc, batches, [batches.next()], _NoLog())
    with PeakMeter(device, base=tensor_bytes(model)) as meter, contextlib.redirect_stdout(io.StringIO()):
        train_phase(model, Phase(PIPELINE[0].name, "bench", 2, 1e-3), run)
    return {"peak": meter.peak, "saved": saved}


def measure_transition(s, index: int, device: torch.device) -> dict:
    """Peak of training.transition.transition into PIPELINE[index], the previous stage's model (fresh) on device."""
    configs = stage_configs(s)
    torch.manual_seed(0)
    model = build_model(configs[0]).to(device)
    rt = Runtime(device)
    rows = min(8, s.train.batch_size)
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, configs[0].vocab_size, (rows, s.train.seq_len), generator=generator)
    data = types.SimpleNamespace(calibration=calibration)
    with contextlib.redirect_stdout(io.StringIO()):
        for i in range(1, index):
            model = transition(PIPELINE[i], model, data, s, rt).model
        with PeakMeter(device, base=tensor_bytes(model)) as meter:
            result = transition(PIPELINE[index], model, data, s, rt)
    return {"peak": meter.peak, "passed": result.passed}


def measure_clones(cfg: ModelConfig, scale: int, device: torch.device) -> int:
    """Bytes measure_clone_divergence allocates on a grown model at its peak (above the weights)."""
    model = build_model(cfg).to(device)
    with PeakMeter(device) as meter:
        measure_clone_divergence(model, scale)
    return meter.peak


# ------------------------------------------------------------------------------------------ cases
def _train(s, **changes) -> TrainConfig:
    return replace(s.train, warmup_steps=1, eval_batches=1, log_interval=1000, eval_interval=1000,
                   checkpoint_interval=1000, **changes)


def step_cases(quick: bool, device: str) -> list[tuple[str, ModelConfig, TrainConfig, str]]:
    """(name, model config, train config, precision): dense and MoE, micro and cpu-preset sizes, fp32 and bf16,
    with and without activation checkpointing and accumulation."""
    micro, cpu = build_settings("micro"), build_settings("cpu")
    m, c = stage_configs(micro), stage_configs(cpu)
    precisions = ("fp32", "bf16")
    cases = []
    for p in precisions:
        cases += [(f"micro dense {p}", m[0], _train(micro), p),
                  (f"micro dense {p} checkpointing", m[0], _train(micro, activation_checkpointing=True), p),
                  (f"micro dense {p} accum 2", m[0], _train(micro, batch_size=4, grad_accum_steps=2), p),
                  (f"micro MoE {p}", m[1], _train(micro), p),
                  (f"micro MoE {p} checkpointing", m[1], _train(micro, activation_checkpointing=True), p)]
    if quick:
        return cases
    small = 16 if device == "cuda" else 4  # bf16 matmuls are slow on CPUs: fewer sequences there
    cases += [("cpu dense fp32", c[0], _train(cpu), "fp32"),
              ("cpu dense fp32 checkpointing", c[0], _train(cpu, activation_checkpointing=True), "fp32"),
              ("cpu dense bf16", c[0], _train(cpu, batch_size=small), "bf16"),
              ("cpu MoE fp32", c[1], _train(cpu, batch_size=8), "fp32"),
              ("cpu MoE bf16 checkpointing", c[1], _train(cpu, batch_size=small, activation_checkpointing=True),
               "bf16"),
              ("cpu grown MoE fp32", c[2], _train(cpu, batch_size=4), "fp32")]
    return cases


def _error(plan: int, measured: int) -> float:
    return (plan - measured) / measured


def run(device: torch.device, quick: bool, save=lambda result: None) -> dict:
    """Every case, plan against measurement; save(result so far) after each."""
    rows: list[dict] = []
    how = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
           "torch.profiler profile_memory timeline (CPU allocator), plus the weights live before")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "measured_with": how, "error": "(plan - measured) / measured", "summary": {}, "rows": rows}

    def done(row: dict) -> None:
        rows.append(row)
        _print_row(row)
        result["summary"] = _summary(rows)
        save(result)

    for name, cfg, tc, precision in step_cases(quick, device.type):
        t = time.time()
        got = measure_step(cfg, tc, precision, device)
        terms, step_peak, moment = step_memory(cfg, tc, precision)
        plan_peak = max(step_peak, eval_memory(cfg, tc, precision, clones=False))
        w, N = WIDTHS[precision], tc.batch_size * tc.seq_len
        plan_saved = N * (cfg.n_layers * block_saved_bytes(cfg, w) + head_saved_bytes(cfg, w))
        plan_saved += autocast_weights(cfg) if w.autocast else 0
        done({"kind": "step", "case": name, "precision": precision, "batch_size": tc.batch_size,
              "seq_len": tc.seq_len, "grad_accum_steps": tc.grad_accum_steps,
              "activation_checkpointing": tc.activation_checkpointing, "params": parameter_count(cfg),
              "plan_terms": terms, "plan_moment": moment, "plan_peak": plan_peak, "measured_peak": got["peak"],
              "error": _error(plan_peak, got["peak"]), "plan_saved": plan_saved, "measured_saved": got["saved"],
              "saved_error": _error(plan_saved, got["saved"]), "seconds": round(time.time() - t, 1)})
    presets = ("micro",) if quick else ("micro", "cpu")
    for preset in presets:
        s = build_settings(preset)
        configs = stage_configs(s)
        for i in range(1, len(PIPELINE)):
            t = time.time()
            got = measure_transition(s, i, device)
            terms, peak = transition_memory(configs[i - 1], configs[i], s.train, device.type)
            done({"kind": "transition", "case": f"{preset} transition {i} ({PIPELINE[i].name})",
                  "plan_terms": terms, "plan_peak": peak, "measured_peak": got["peak"],
                  "error": _error(peak, got["peak"]), "checks_passed": got["passed"],
                  "seconds": round(time.time() - t, 1)})
        grown = configs[-1]
        got = measure_clones(grown, s.growth.scale_factor, device)
        plan = clone_divergence_bytes(grown)
        done({"kind": "clone divergence", "case": f"{preset} grown MoE clone divergence", "plan_peak": plan,
              "measured_peak": got, "error": _error(plan, got)})
    return result


def _summary(rows: list[dict]) -> dict:
    """The largest |error| of each kind of case measured so far."""
    out = {}
    kinds = (("step", "error"), ("step", "saved_error"), ("transition", "error"), ("clone divergence", "error"))
    for kind, key in kinds:
        errors = [abs(r[key]) for r in rows if r["kind"] == kind]
        if errors:
            out[f"{kind.replace(' ', '_')}_{key.replace('error', 'max_abs_error')}"] = max(errors)
    return out


def _print_row(r: dict) -> None:
    saved = ""
    if "saved_error" in r:
        saved = (f"  saved {r['plan_saved'] / 2**20:8.2f} / {r['measured_saved'] / 2**20:8.2f} MiB "
                 f"{100 * r['saved_error']:+6.1f}%")
    print(f"{r['case']:<36} peak plan {r['plan_peak'] / 2**20:8.2f} MiB  measured {r['measured_peak'] / 2**20:8.2f} MiB"
          f"  {100 * r['error']:+6.1f}%{saved}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="micro cases only")
    parser.add_argument("--out-dir", default=RESULTS, help="folder of the JSON (default bench/results)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device=cuda but torch sees no CUDA device: nothing measured")
        sys.exit(3)
    out = os.path.join(args.out_dir, "memory_model" + ("_cuda" if device.type == "cuda" else "") + ".json")
    os.makedirs(args.out_dir, exist_ok=True)

    def save(result: dict) -> None:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    print(f"plan vs measured peak ({'max_memory_allocated' if device.type == 'cuda' else 'profiler timeline'}); "
          "error = (plan - measured) / measured")
    result = run(device, args.quick, save)
    print("max |error|: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["summary"].items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

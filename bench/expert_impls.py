"""MoE layer forward + backward through each expert path (models/moe.py), eager and compiled, on this machine.

    python bench/expert_impls.py                       # the cpu and cuda presets' MoE layer shapes, fp32 and bf16
    python bench/expert_impls.py --reps 20 --compile

Contenders alternate step by step after warm-up, one process; medians in ms. Every path is checked against the
loop on the same inputs first. Figures, not assertions: run it on a quiet machine. The eager default on CPU
(models.moe.EAGER_CPU_IMPL) follows what this measures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.moe import MoEFeedForward, grouped_mm_runs  # noqa: E402

SHAPES = {"cpu": dict(dim=128, ffn=352, experts=4, tokens=16 * 256), "cuda": dict(dim=256, ffn=704, experts=8,
                                                                                   tokens=8 * 512)}


def layer(dim: int, ffn: int, experts: int, impl: str, device: torch.device) -> MoEFeedForward:
    """A seeded MoE layer with the given expert path."""
    torch.manual_seed(0)
    moe = MoEFeedForward(dim, ffn, experts, 2).to(device)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe.impl = impl
    return moe


def step(moe: MoEFeedForward, x: torch.Tensor, dtype: torch.dtype, compiled: bool):
    """One forward + backward of the layer under autocast in dtype (fp32: no autocast)."""
    fwd = torch.compile(moe) if compiled else moe

    def go() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = fwd(x)[0]
        y.float().square().mean().backward()
        return y
    return go


def race(steps: dict, reps: int, device: torch.device) -> dict[str, float]:
    """Median ms per call, alternated, after 3 warm-up calls each."""
    times = {k: [] for k in steps}
    for i in range(reps + 3):
        for name, go in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            go()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times[name].append(1000 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also race the compiled layer (bf16 only: fullgraph)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in a.shapes:
        sh = SHAPES[name]
        x = torch.randn(sh["tokens"], sh["dim"], device=device, requires_grad=True)
        for dtype in (torch.float32, torch.bfloat16):
            impls = ["loop", "loop_op"] + (["grouped_mm"] if grouped_mm_runs(device, dtype) else [])
            steps = {f"{impl} eager": step(layer(sh["dim"], sh["ffn"], sh["experts"], impl, device), x, dtype, False)
                     for impl in impls}
            if a.compile and dtype == torch.bfloat16:
                for impl in ("loop_op", "grouped_mm"):
                    if impl in impls:
                        steps[f"{impl} compiled"] = step(layer(sh["dim"], sh["ffn"], sh["experts"], impl, device), x,
                                                         dtype, True)
            ref = steps["loop eager"]()
            for k, go in steps.items():
                err = (go().float() - ref.float()).abs().max().item()
                assert err < (1e-4 if dtype == torch.float32 else 3e-2), (k, err)
            t = race(steps, a.reps, device)
            print(f"{name} preset layer ({sh['tokens']} tokens, dim {sh['dim']}, {sh['experts']} experts), "
                  f"{str(dtype).split('.')[1]}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in t.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

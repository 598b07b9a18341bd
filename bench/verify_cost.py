"""Cost of the growth checks against model size, as a share of one phase-3 training step.

    python bench/verify_cost.py            # three sizes (dim 64, 128, 256 before growth), default growth x2 +4
    OMP_NUM_THREADS=1 python bench/verify_cost.py --clock=cpu      # on a machine other jobs share

For each size: time of each check and of detailed_growth_check (all five on shared copies and one shared
gradient) on a batch of 8 x seq tokens, and the time of one training step (forward, backward, AdamW) of the
grown model on the same batch; the share is check time / step time, i.e. how many training steps the
verification costs. Also the time of measure_clone_divergence, which phase 3 runs at every eval. Figures,
not assertions. Writes verify_cost.json and verify_cost.png to --out-dir (default bench/results).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ModelConfig, TrainConfig  # noqa: E402
from data.synthetic import byte_token_batch, generate_stories  # noqa: E402
from models import build_model  # noqa: E402
from training.loop import lm_loss, make_optimizer  # noqa: E402
from transfer import (check_functional_equivalence, check_rope_integrity, check_router_integrity,  # noqa: E402
                      check_symmetry_breaking, check_trainability, dense_to_moe, detailed_growth_check,
                      measure_clone_divergence, scale_bilaterally)

CHECKS = ("rope", "router", "symmetry", "functional", "trainability")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # --clock: cpu counts the CPU seconds of this process (all its threads), which other jobs
# on the machine move far less than wall time (they delay it; they do not add to it)


def seconds(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def train_step_seconds(model, tokens) -> float:
    """Median seconds of one training step with the pipeline's objective and optimizer, on a copy: the checks
    are then timed on the grown model as growth made it (passing), not on weights the steps moved."""
    model = copy.deepcopy(model)
    tc = TrainConfig()
    opt = make_optimizer(model, 1e-5, tc)

    def step():
        lm_loss(model, tokens[:, :-1], tokens[:, 1:], tc)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # warm-up (optimizer state allocation)
    return seconds(step)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['params'] / 1e6:.0f}M" for r in rows]
    bottom = [0.0] * len(rows)
    for name in CHECKS:
        vals = [r["seconds"][name] / r["step_seconds"] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(labels, [r["seconds"]["all"] / r["step_seconds"] for r in rows], "k_", ms=40, mew=2,
            label="detailed_growth_check (all five, shared copies and gradient)")
    ax.set_ylim(0, 1.6 * max(bottom))  # room for the legend above the bars
    ax.set_xlabel("grown MoE parameters")
    ax.set_ylabel("cost in phase-3 training steps")
    ax.set_title("Verification cost at transition 2 (one batch of 8 x 256 tokens)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=os.path.join("bench", "results"))
    p.add_argument("--grown_steps", type=int, default=250, help="phase-3 length the share is quoted against "
                   "(the cpu preset's)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall seconds (default; a quiet "
                   "machine) or CPU seconds of this process (a shared, loaded one: run it with OMP_NUM_THREADS=1)")
    p.add_argument("--dims", default="64,128,256", help="model widths before growth")
    a = p.parse_args(argv)
    global clock
    clock = CLOCKS[a.clock]
    text = " ".join(generate_stories(1500))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.clock} clock, load average "
          f"{os.getloadavg()[0]:.2f}; growth x2 +4 layers, 8 experts top-2")
    print(f"{'dim':>5} {'grown params':>13} {'step s':>7} " + " ".join(f"{n:>10}" for n in
          CHECKS + ("all five", "share", "divergence")))
    rows = []
    for dim in (int(d) for d in a.dims.split(",")):
        seq = 256
        tokens = byte_token_batch(text, 8, seq + 1) % 4096
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=4096, dim=dim, n_layers=4, n_heads=max(1, dim // 64), max_seq_len=seq + 1)
        moe = dense_to_moe(build_model(cfg), 8, 2, calibration_tokens=tokens)
        big = scale_bilaterally(moe, 2, 4, calibration_tokens=tokens)
        step = train_step_seconds(big, tokens)
        t = {"rope": seconds(lambda: check_rope_integrity(moe, big, tokens), 1),
             "router": seconds(lambda: check_router_integrity(moe, big, tokens), 1),
             "symmetry": seconds(lambda: check_symmetry_breaking(big, tokens), 1),
             "functional": seconds(lambda: check_functional_equivalence(moe, big, tokens), 1),
             "trainability": seconds(lambda: check_trainability(big, tokens), 1),
             "all": seconds(lambda: detailed_growth_check(moe, big, tokens, verbose=False), 1),
             "divergence": seconds(lambda: measure_clone_divergence(big, 2))}
        rows.append(dict(dim=dim, params=big.num_parameters(), step_seconds=step, seconds=t))
        print(f"{dim:>5} {big.num_parameters():>13,} {step:>7.2f} "
              + " ".join(f"{t[k]:>9.2f}s" for k in CHECKS + ("all",))
              + f" {t['all'] / step:>5.1f} steps ({100 * t['all'] / step / a.grown_steps:.1f}% of a "
              f"{a.grown_steps}-step phase 3) {t['divergence'] / step:>5.3f} steps")
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "verify_cost.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), clock=a.clock,
                       load_average=os.getloadavg()[0], rows=rows), f, indent=1)
    plot(rows, os.path.join(a.out_dir, "verify_cost.png"))
    print(f"wrote {a.out_dir}/verify_cost.json and verify_cost.png")


if __name__ == "__main__":
    main(sys.argv[1:])

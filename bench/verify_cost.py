"""Cost of the growth checks against model size, as a share of one phase-3 training step.

    python bench/verify_cost.py            # three sizes (dim 64, 128, 256 before growth), default growth x2 +4

For each size: time of each check and of detailed_growth_check on a batch of 8 x seq tokens, and the time of
one training step (forward, backward, AdamW) of the grown model on the same batch; the share is
check time / step time, i.e. how many training steps the verification costs. Figures, not assertions.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ModelConfig  # noqa: E402
from data.synthetic import byte_token_batch, generate_stories  # noqa: E402
from models import build_model  # noqa: E402
from transfer import (check_functional_equivalence, check_rope_integrity, check_router_integrity,  # noqa: E402
                      check_symmetry_breaking, dense_to_moe, detailed_growth_check, scale_bilaterally)


def seconds(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step_seconds(model, tokens) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # warm-up (optimizer state allocation)
    return seconds(step)


def main() -> None:
    text = " ".join(generate_stories(1500))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; growth x2 +4 layers, 8 experts top-2")
    print(f"{'dim':>5} {'grown params':>13} {'step s':>7} " + " ".join(f"{n:>10}" for n in
          ("rope", "router", "symmetry", "functional", "all four", "share")))
    for dim in (64, 128, 256):
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
             "all": seconds(lambda: detailed_growth_check(moe, big, tokens, verbose=False), 1)}
        print(f"{dim:>5} {big.num_parameters():>13,} {step:>7.2f} " + " ".join(f"{v:>9.2f}s" for v in t.values())
              + f" {t['all'] / step:>9.1f} steps")


if __name__ == "__main__":
    main()

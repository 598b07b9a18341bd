"""Exactness of the growth operators and cost of the four checks, on the default model sizes.

    python bench/growth_exactness.py                 # defaults from config.py (dim 256, 4 layers, 8 experts)
    python bench/growth_exactness.py --dim=128 --n_layers=2

Prints, for scale factors 1-4 and 0/4/8 extra layers at the default noise, max |delta logits| / RMS(logits)
between the MoE and its grown model in fp32 and in float64, then the time of each check and of
detailed_growth_check for the default growth. Figures, not assertions: the tests hold the limits.
"""
from __future__ import annotations

import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError  # noqa: E402
from data.synthetic import byte_token_batch, generate_stories  # noqa: E402
from models import build_model  # noqa: E402
from training.settings import build_settings, make_parser, parse_command_line  # noqa: E402
from transfer import (check_functional_equivalence, check_rope_integrity, check_router_integrity,  # noqa: E402
                      check_symmetry_breaking, dense_to_moe, detailed_growth_check, scale_bilaterally)


def logit_drift(old, new, tokens, dtype) -> float:
    old, new = copy.deepcopy(old).to(dtype), copy.deepcopy(new).to(dtype)
    with torch.no_grad():
        a, b = old(tokens), new(tokens)
    return ((b - a).abs().max() / a.pow(2).mean().sqrt()).item()


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def main(argv: list[str]) -> int:
    try:
        _, overrides = parse_command_line(make_parser(__doc__.split("\n")[0]), argv)
        s = build_settings(None, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    growth, cfg, seed = s.growth, s.model, s.run.seed
    torch.manual_seed(seed)
    seq = min(cfg.max_seq_len, 256)
    tokens = byte_token_batch(" ".join(generate_stories(800)), 8, seq) % cfg.vocab_size
    moe = dense_to_moe(build_model(cfg), growth.n_experts, growth.top_k, calibration_tokens=tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MoE dim {cfg.dim}, {cfg.n_layers} layers, "
          f"{growth.n_experts} experts top-{growth.top_k}; tokens {tuple(tokens.shape)}; noise_std {growth.noise_std}")
    print(f"{'scale':>5} {'extra':>5} {'params':>12} {'fp32 drift':>11} {'fp64 drift':>11}")
    for scale in (1, 2, 3, 4):
        for extra in (0, 4, 8):
            big = scale_bilaterally(moe, scale, extra, growth.noise_std, seed)
            d32, d64 = logit_drift(moe, big, tokens[:2], torch.float32), logit_drift(moe, big, tokens[:2], torch.float64)
            print(f"{scale:>5} {extra:>5} {big.num_parameters():>12,} {d32:>11.2e} {d64:>11.2e}")
    big = scale_bilaterally(moe, growth.scale_factor, growth.extra_layers, growth.noise_std, seed,
                            calibration_tokens=tokens)
    print(f"\ncheck timings, default growth x{growth.scale_factor} +{growth.extra_layers} "
          f"({big.num_parameters():,} params), tokens {tuple(tokens.shape)}:")
    for name, fn in [("rope", lambda: check_rope_integrity(moe, big, tokens)),
                     ("router", lambda: check_router_integrity(moe, big, tokens)),
                     ("symmetry", lambda: check_symmetry_breaking(big, tokens)),
                     ("functional", lambda: check_functional_equivalence(moe, big, tokens)),
                     ("detailed_growth_check", lambda: detailed_growth_check(moe, big, tokens, verbose=False))]:
        result, seconds = timed(fn)
        passed = result.passed
        print(f"  {name:<22} {seconds:6.2f} s  {'passed' if passed else 'FAILED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Quick check of the growth mechanics: dense -> MoE, then bilateral growth, each verified.

    python test_growth_checks.py                  # defaults from config.py
    python test_growth_checks.py --noise_std=0    # see the symmetry check catch pure clones (exit 1)
    python test_growth_checks.py --text-file ../shared/data/tinystories/train.txt

Trains the dense model for a few steps on byte-level text (the project's own generated stories unless
--text-file is given) so the checks see trained weights, upcycles it with a router centred on that text,
and grows the MoE straight away (the pipeline, train_tinystories.py, trains the MoE in between).
Exit code 0 when every check passes, 1 when one fails, 2 on bad arguments.
"""
from __future__ import annotations

import sys
import time

import torch

from config import ConfigError
from data.synthetic import byte_token_batch, generate_stories
from models import build_model
from training.loop import lm_loss
from training.settings import build_settings, make_parser, parse_command_line
from transfer import dense_to_moe, detailed_growth_check, scale_bilaterally, upcycling_check


def train_briefly(model: torch.nn.Module, tokens: torch.Tensor, steps: int, tc, lr: float = 3e-3) -> float:
    """A few AdamW steps of the pipeline's objective on one batch; returns the last next-token loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss, total = lm_loss(model, tokens[:, :-1], tokens[:, 1:], tc)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return loss.item()


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__.split("\n")[0], epilog="Settings are config.py's defaults (no preset); e.g. --noise-std=0")
    parser.add_argument("--text-file", help="real text to draw the token batch from (default: generated stories)")
    parser.add_argument("--steps", type=int, default=20, help="dense training steps before upcycling")
    try:
        args, overrides = parse_command_line(parser, argv)
        s = build_settings(None, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    growth, model_cfg, seed = s.growth, s.model, s.run.seed
    if args.text_file:
        try:
            text = open(args.text_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read --text-file {args.text_file}: {e}", file=sys.stderr)
            return 2
    else:
        text = " ".join(generate_stories(400, seed=seed))
    seq_len = min(model_cfg.max_seq_len, 128) + 1
    tokens = byte_token_batch(text, 8, seq_len) % model_cfg.vocab_size
    torch.manual_seed(seed)
    t0 = time.time()

    print("=" * 72 + "\nTEST 1: Dense -> MoE transition (sparse upcycling)\n" + "=" * 72)
    dense = build_model(model_cfg)
    loss = train_briefly(dense, tokens, args.steps, s.train)
    moe = dense_to_moe(dense, growth.n_experts, growth.top_k, seed, growth.router_init_std, tokens)
    print(f"dense: {dense.num_parameters():,} params, loss {loss:.3f} after {args.steps} steps -> MoE "
          f"{moe.num_parameters():,} params ({growth.top_k} of {growth.n_experts} experts active)")
    test1 = upcycling_check(dense, moe, tokens).passed

    print("\n" + "=" * 72 + f"\nTEST 2: Bilateral growth (width x{growth.scale_factor}, "
          f"+{growth.extra_layers} layers, noise_std {growth.noise_std})\n" + "=" * 72)
    grown = scale_bilaterally(moe, growth.scale_factor, growth.extra_layers, growth.noise_std, seed, tokens)
    c = grown.config
    print(f"MoE dim {moe.config.dim}, {moe.config.n_layers} layers -> grown: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads, "
          f"{grown.num_parameters():,} params")
    report = detailed_growth_check(moe, grown, tokens)
    print(f"\n(total {time.time() - t0:.1f} s)")
    return 0 if test1 and report.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

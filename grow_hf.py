"""Grow a transformers checkpoint, verified: upcycle it into an MoE, widen it, deepen it; check; write; load back.

    python grow_hf.py SRC OUT --n_experts=8 --top_k=2            # Llama -> Mixtral (sparse upcycling)
    python grow_hf.py SRC OUT --scale_factor=2 --extra_layers=2  # width x2 (HyperCloning) and 2 identity blocks
    python grow_hf.py SRC OUT --scale_factor=2 --plan            # peak memory, disk and time; grows nothing
    python grow_hf.py SRC OUT --n_experts=4 --dtype=float32 --tokens story.txt

SRC: a transformers Llama or Mixtral directory (config.json, safetensors, tokenizer files if any). Settings are
GrowthConfig's fields (--n_experts, --top_k, --router_init_std, --scale_factor, --extra_layers, --noise_std) and
--seed; unset ones grow nothing (--n_experts=0 keeps the FFN as it is). The checks run in float64 on the exact
growth before anything is written; OUT (a transformers checkpoint in the source's dtype or --dtype, its tokenizer,
grow_report.html and grow_hf.json) is written into a temporary sibling, loaded back by transformers, its logits
compared with SRC's, and only then renamed into place.

Exit 0: written and verified. 1: a check failed (diagnosis and fix printed; nothing at OUT). 2: bad input (one
line naming it, before any work): an unreadable or unsupported checkpoint, OUT exists, a bad setting.
"""
from __future__ import annotations

import sys
from dataclasses import fields

from config import ConfigError
from training.hf_growth import DTYPES, Growth, GrowRequest, grow_checkpoint
from training.settings import find_setting, make_parser, parse_command_line

OWN_DOCS = {"n_experts": "experts per MoE layer made by upcycling (each a copy of the dense FFN); 0 keeps the FFN",
            "top_k": "experts each token is routed to (2 unless given; only with --n_experts)",
            "seed": "seed of the symmetry-breaking noise and the routers' initialisation"}
SETTINGS = tuple(f.name for f in fields(Growth))  # GrowthConfig's growth fields and the seed


def parse(argv: list[str]) -> GrowRequest:
    """The validated command line; ConfigError (one line) for anything it does not take."""
    p = make_parser(__doc__.split("\n")[0])
    p.add_argument("src", help="the transformers checkpoint directory to grow")
    p.add_argument("out", help="where to write the grown checkpoint (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the written weights (default: the source's)")
    p.add_argument("--tokens", metavar="FILE", help="UTF-8 text for the checks' batch, tokenized with SRC's tokenizer "
                   "(default: the project's generated stories)")
    p.add_argument("--plan", action="store_true", help="print the expected peak memory, disk and time; grow nothing")
    if "-h" in argv or "--help" in argv:
        print(p.format_help().rstrip() + "\n\n" + settings_help())
        raise SystemExit(0)
    args, overrides = parse_command_line(p, argv)
    given = {k: v for section in overrides.values() for k, v in section.items()}  # names are unique in SETTINGS
    stray = [k for section, values in overrides.items() for k in values
             if k not in SETTINGS or section not in ("growth", "run")]
    if stray:
        raise ConfigError(f"--{stray[0]} is not a setting of grow_hf.py; it takes "
                          + ", ".join(f"--{s}" for s in SETTINGS))
    return GrowRequest(args.src, args.out, Growth(**given), args.dtype, args.tokens, args.plan)


def settings_help() -> str:
    """This command's settings with its own defaults (no growth) and config.py's line on each."""
    lines = ["settings (GrowthConfig's fields and the seed; --name=value or --name value):"]
    for f in fields(Growth):
        lines.append(f"  --{f.name:<17} {str(f.default):<7} {OWN_DOCS.get(f.name) or find_setting(f.name).doc}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        request = parse(argv)
    except ConfigError as e:
        print(f"grow_hf: {e}", file=sys.stderr)
        return 2
    return grow_checkpoint(request)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Sample stories from a checkpoint of any phase, streaming the text as it is generated.

    python sample.py --checkpoint runs/cpu --prompt "Once upon a time"
    python sample.py --checkpoint runs/cpu/checkpoints/dense-001200 --num_samples 3 --temperature 0.9 --seed 7
    python sample.py --checkpoint runs/micro --prompt "Lily saw" --temperature 0       # greedy (argmax)

Each sample is the prompt, then the continuation as it is generated, then a line of dashes; it ends at the
end-of-text token or after --max_new_tokens. The prompt follows an end-of-text token, as every story but the first
does in training, so the model knows a story starts there; a prompt longer than the context keeps its last
max_seq_len tokens (nanoGPT's crop). The same seed gives the same text on the same device (CUDA: bf16 autocast).
Exit codes: 0 sampled, 2 bad input (no checkpoint, bad option), before any sampling.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Iterator

import torch
from torch import Tensor, nn

from config import ConfigError
from models import generate
from training.run_state.checkpoint import CheckpointError
from training.parallel.runtime import resolve_device
from training.inference import load_for_inference
from training.scoring import autocast
from training.settings import OneLineParser

SEPARATOR = "-" * 15


def prompt_ids(tokenizer, prompt: str) -> Tensor:
    """(1, T) int64: eos, then the prompt's tokens."""
    return torch.tensor([[tokenizer.eos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)])


def stream_sample(model: nn.Module, tokenizer, prompt: Tensor, max_new_tokens: int, temperature: float,
                  top_k: int | None, generator: torch.Generator) -> Iterator[str]:
    """The continuation's text in pieces as it is generated: the project's sampler one token at a time, so the
    pieces join to exactly what one generate() call with the same generator gives. A piece is emitted only once
    it decodes cleanly: a byte-level token can end inside a multi-byte UTF-8 character."""
    eos, window, device = tokenizer.eos_token_id, model.config.max_seq_len, next(model.parameters()).device
    ids, new, shown = prompt[:, -window:].to(device), [], ""
    for _ in range(max_new_tokens):
        with autocast(device):
            ids = generate(model, ids[:, -window:], 1, temperature, top_k, eos, generator)
        token = ids[0, -1].item()
        if token == eos:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # U+FFFD: the decoder's stand-in for an unfinished character
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(new)
    if text != shown:  # bytes that never completed a character: show them as the decoder does
        yield text[len(shown):]


def parse(argv: list[str]):
    """The options, validated; ConfigError (one line) for a bad one."""
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint")
    p.add_argument("--prompt", default="", help="start of the story (default: none, the model starts one)")
    p.add_argument("--num_samples", "--num-samples", type=int, default=1, help="samples to draw (default 1)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200, help="tokens per sample at most")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top_k", "--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0 = all")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    args = p.parse_args(argv)
    problems = [f"--{n}={getattr(args, n)} must be >= {low}" for n, low in
                (("num_samples", 1), ("max_new_tokens", 1), ("top_k", 0)) if getattr(args, n) < low]
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature={args.temperature} must be a number >= 0 (0 = greedy)")
    if problems:
        raise ConfigError("; ".join(problems))
    return args


def main(argv: list[str]) -> int:
    try:
        args = parse(argv)
        loaded = load_for_inference(args.checkpoint, resolve_device(args.device))
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = prompt_ids(tokenizer, args.prompt)
    if prompt.shape[1] > model.config.max_seq_len:
        print(f"note: the prompt is {prompt.shape[1] - 1} tokens; the model sees only the last "
              f"{model.config.max_seq_len} (its max_seq_len)", file=sys.stderr)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # CPU: generate() draws its samples there
    for _ in range(args.num_samples):
        print(args.prompt, end="", flush=True)
        for piece in stream_sample(model, tokenizer, prompt, args.max_new_tokens, args.temperature,
                                   args.top_k or None, generator):
            print(piece, end="", flush=True)
        print(f"\n{SEPARATOR}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

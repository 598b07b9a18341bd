"""Score a checkpoint on whole stories: loss per token, perplexity and bits per byte.

    python evaluate.py --checkpoint runs/cpu                    # the run's newest checkpoint, its validation split
    python evaluate.py --checkpoint runs/cpu/checkpoints/dense-001200 --data-files valid.txt --max_stories 500
    python evaluate.py --checkpoint runs/cpu --json                 # one JSON object, for scripts

By default the stories are the run's own validation split, rebuilt from data_source.json and settings.json exactly
as training held it out. Bits per byte (total nats / ln 2 / UTF-8 bytes of the stories) compares models whose
tokenizers differ; loss per token and perplexity compare only at the same tokenizer. How the stories become
windows, and what the eos separators count for: training/scoring.py. On CUDA the forward runs in bf16 autocast.
Exit codes: 0 scored, 2 bad input (no checkpoint, bad option, missing data), before any scoring.
"""
from __future__ import annotations

import argparse
import json
import sys

from config import ConfigError
from data.text import DataError, check_files
from training.run_state.checkpoint import CheckpointError
from training.parallel.runtime import resolve_device
from training.inference import file_stories, load_for_inference, validation_stories
from training.scoring import score_stories
from training.settings import OneLineParser


def parse(argv: list[str]):
    """The options, validated; ConfigError (one line) for a bad one."""
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint")
    p.add_argument("--data-files", "--data_files", nargs="+", help="score these .txt/.json/.jsonl files' stories "
                   "instead of the run's validation split")
    p.add_argument("--max_stories", "--max-stories", type=int, help="score only the first N stories")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--context", type=int, help="tokens per window (default: the run's training seq_len, <= "
                   "max_seq_len: positions beyond it were never trained)")
    p.add_argument("--stride", type=int, help="new predictions scored per window after the first (default "
                   "context // 2; context = non-overlapping windows, as the training eval)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text block")
    args = p.parse_args(argv)
    for name in ("max_stories", "batch_size", "context", "stride"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}={value} must be >= 1")
    if args.data_files:
        check_files(args.data_files)  # cheap: exists, readable, not empty, known extension
    return args


def window_sizes(args, model, ckpt) -> tuple[int, int]:
    """(context, stride): given, else the run's training seq_len and half of it; ConfigError if out of range."""
    max_len = model.config.max_seq_len
    trained = ckpt.meta.get("settings", {}).get("train", {}).get("seq_len", max_len)
    context = args.context or min(trained, max_len)
    if context > max_len:
        raise ConfigError(f"--context={context} exceeds the model's max_seq_len={max_len}; use --context <= {max_len}")
    stride = args.stride or max(1, context // 2)
    if stride > context:
        raise ConfigError(f"--stride={stride} exceeds the context of {context} tokens; use --stride <= {context}")
    return context, stride


def report(result: dict) -> str:
    """The figures in one block."""
    r = result
    return "\n".join([
        f"checkpoint  {r['checkpoint']} ({r['phase']}, step {r['step']}, {r['parameters']:,} parameters)",
        f"data        {r['data']}",
        f"scored      {r['stories']:,} stories: {r['bytes']:,} UTF-8 bytes, {r['tokens']:,} tokens predicted "
        f"(each story's and its end-of-text), windows of {r['context']} tokens, stride {r['stride']}",
        f"loss        {r['loss_per_token']:.5f} nats per token",
        f"perplexity  {r['perplexity']:.4f}",
        f"bits/byte   {r['bits_per_byte']:.5f}",
    ])


def main(argv: list[str]) -> int:
    try:
        args = parse(argv)
        device = resolve_device(args.device)
        loaded = load_for_inference(args.checkpoint, device)
        context, stride = window_sizes(args, loaded.model, loaded.checkpoint)
        if args.data_files:
            stories, data = file_stories(args.data_files)
        else:
            stories, data = validation_stories(loaded.run_dir, loaded.checkpoint)
        if not stories:
            raise DataError(f"no stories to score in {data}; pass files that hold stories with --data-files")
    except (ConfigError, CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stories = stories[:args.max_stories] if args.max_stories else stories
    score = score_stories(loaded.model, loaded.tokenizer, stories, device, args.batch_size, context, stride)
    ckpt = loaded.checkpoint
    result = dict(checkpoint=ckpt.path, phase=ckpt.phase, step=ckpt.meta.get("step"),
                  parameters=loaded.model.num_parameters(), data=data, context=context, stride=stride,
                  **score.to_dict())
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

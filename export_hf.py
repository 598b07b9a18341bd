"""Export a checkpoint to Hugging Face `transformers` as the family its features need: dense -> LlamaForCausalLM,
MoE -> MixtralForCausalLM; a model started from a Qwen2 / Qwen3 / Mistral checkpoint (--init-from-hf) -> that
family or its MoE form (Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, MixtralForCausalLM).

    python export_hf.py --checkpoint runs/cpu/checkpoints/grown-000250 --out hf/grown
    python export_hf.py --checkpoint runs/cpu --out hf/latest          # a run directory: its newest checkpoint
    python export_hf.py --checkpoint runs/cpu --out hf/bf16 --dtype bf16 --family mistral

Checkpoints of sharded runs (parallel=fsdp) are read alike: they are written whole (training/parallel/sharding.py).
The directory holds config.json, model.safetensors and the run's tokenizer, and loads offline with
AutoModelForCausalLM.from_pretrained(OUT) and AutoTokenizer.from_pretrained(OUT). Exit codes: 0 exported,
2 bad input before any write (no checkpoint, --out not empty, not enough free space for the export), 1 a write
failed during the export (one line naming the file, the cause and the free space; no partial export is left).
"""
from __future__ import annotations

import argparse
import os
import sys

from training.run_state.checkpoint import CheckpointError, find_checkpoint
from common.files import NotEnoughSpace, WriteFailed, check_free_space
from transfer.hf_format import FAMILIES

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--family", choices=FAMILIES, default=None,
                   help="transformers family to write (its MoE form for an MoE); default: the one the model needs")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    args = p.parse_args(argv)
    try:
        if os.path.exists(args.out) and os.listdir(args.out):
            raise ValueError(f"{args.out} exists and is not empty; choose a new --out (nothing is overwritten)")
        ckpt, run_dir = find_checkpoint(args.checkpoint)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from data import load_tokenizer
    from transfer.hf_format import ARCHITECTURES, UnsupportedModel, export_bytes, export_hf, target_family

    tok_dir = os.path.join(run_dir, "tokenizer")
    tokenizer = load_tokenizer(tok_dir) if os.path.exists(os.path.join(tok_dir, "tokenizer.json")) else None
    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        model = ckpt.load_model()
        family = target_family(model.config, args.family)
    except (CheckpointError, UnsupportedModel) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        check_free_space(args.out, {"weights, configs and tokenizer": export_bytes(model, dtype)},
                         fix="free space or choose another --out")
    except NotEnoughSpace as e:  # before anything is written: bad input, like an occupied --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        export_hf(model, args.out, tokenizer, family=family, dtype=dtype)
    except WriteFailed as e:  # the export was under way: a failure of the work, not of the input
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {ckpt.path} ({ckpt.phase}, step {ckpt.meta['step']}, {model.num_parameters():,} parameters) "
          f"as {ARCHITECTURES[family]} ({args.dtype}) to {args.out}"
          + ("" if tokenizer else " (no tokenizer found beside the checkpoints)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

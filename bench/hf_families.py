"""How exactly each transformers family reads, writes and grows: max |delta logits| / RMS(logits) per family.

    python bench/hf_families.py                  # hidden 64, 2 layers, 4 heads / 2 kv heads, 128 tokens x 4
    python bench/hf_families.py --hidden 128 --layers 4

For each family, a transformers model built from its config (weights moved off init: biases nonzero, norms away
from 1) is read with from_hf and compared with transformers in fp32 ("read"); exported with export_hf as its family
and loaded back by AutoModelForCausalLM ("export"); grown in float64 (dense: upcycled to 4 experts top-2, then
width x2 and +2 identity blocks; MoE: width x2 and +2 blocks) and compared with the source ("grow f64"); the grown
model exported as the family's MoE form and run by transformers in fp32 against the source in transformers
("grown hf"). Figures, not assertions: tests/test_hf_families.py holds the limits.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transfer.hf_format import export_hf, from_hf, to_hf  # noqa: E402
from transfer.simple_growth import dense_to_moe, scale_bilaterally  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}
MOE = dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
FAMILIES = {  # label: (model_type, fields beyond the shared shape)
    "llama MHA tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama GQA llama3 RoPE": ("llama", dict(rope_scaling=LLAMA3)),
    "mistral window 16": ("mistral", dict(sliding_window=16)),
    "qwen2 q/k/v bias": ("qwen2", dict()),
    "qwen3 q/k norm, head_dim 24": ("qwen3", dict(head_dim=24)),
    "mixtral window 16": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=16)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=24, **MOE)),
    "qwen2_moe (no shared expert)": ("qwen2_moe", dict(shared_expert_intermediate_size=0, **MOE)),
}


def build(model_type: str, fields: dict, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in fields.items()})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if n.endswith("norm.weight") else p + 0.05 * torch.randn_like(p))
    return model.eval()


def rel(ref: torch.Tensor, other: torch.Tensor) -> float:
    ref, other = ref.double(), other.double()
    return ((ref - other).abs().max() / ref.pow(2).mean().sqrt()).item()


@torch.no_grad()
def measure(model_type: str, fields: dict, tokens: torch.Tensor) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    hf = build(model_type, fields)
    ref = hf(tokens).logits
    ours = from_hf(hf)
    out = {"read": rel(ref, ours(tokens))}
    with tempfile.TemporaryDirectory() as d:
        export_hf(ours, d, family=model_type)
        out["export"] = rel(ref, AutoModelForCausalLM.from_pretrained(d).eval()(tokens).logits)
    src = ours.double()
    moe = src if src.config.is_moe else dense_to_moe(src, 4, 2, seed=1)
    grown = scale_bilaterally(moe, 2, 2, noise_std=0.3, seed=1)
    out["grow f64"] = rel(src(tokens), grown(tokens))
    out["grown hf"] = rel(ref, to_hf(grown.float(), family=model_type)(tokens).logits)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shape = dict(vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=max(256, args.seq), rms_norm_eps=1e-5, tie_word_embeddings=False,
                 moe_intermediate_size=args.hidden)
    tokens = torch.randint(0, 512, (4, args.seq), generator=torch.Generator().manual_seed(0))
    cols = ("read", "export", "grow f64", "grown hf")
    print(f"max |delta logits| / RMS(logits), {tuple(tokens.shape)} tokens, hidden {args.hidden}, "
          f"{args.layers} layers")
    print(f"{'family':<30}" + "".join(f"{c:>11}" for c in cols))
    for label, (model_type, fields) in FAMILIES.items():
        extra = {k: v for k, v in shape.items() if not (k == "moe_intermediate_size" and "num_experts" not in fields)}
        figures = measure(model_type, extra | fields, tokens)
        print(f"{label:<30}" + "".join(f"{figures[c]:>11.1e}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

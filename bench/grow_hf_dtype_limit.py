"""Does grow_hf.py's limit for a 16-bit checkpoint separate correct growths from broken ones?

    python bench/grow_hf_dtype_limit.py                  # bf16 sources, dim 64 x 2 layers and dim 256 x 8 layers
    python bench/grow_hf_dtype_limit.py --dtype=float16

A bf16 source is grown exactly (fp32, checked in float64), then written in bf16, where cancelling noise cannot stay
exact: the two noisy halves round separately. grow_hf judges the written checkpoint (loaded back by transformers)
against SRC with the limit WRITTEN_LIMIT + the drift that rounding the grown weights alone causes. This prints, for
correct growths and for broken ones (noise that does not cancel, a copy scaled wrongly, an inserted block that is
not an identity), the drift, the rounding term, the limit and the verdict. Figures, not assertions.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.synthetic import byte_token_batch, generate_stories  # noqa: E402
from training.hf_growth import (DTYPES, Growth, WrittenStats, grow, judge_written, load_logits,  # noqa: E402
                                read_source, rounding_drift, save_checkpoint)
from transfer.checks.pair import relative_drift  # noqa: E402
from transfer.hf_format import from_hf  # noqa: E402


def make_source(path: str, dim: int, layers: int, heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    """A Llama in dtype with weights moved off their init (norms away from 1), saved by transformers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=dim, intermediate_size=dim * 8 // 3 // 32 * 32 + 32,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=dim // heads, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else p + 0.02 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path, safe_serialization=True)


# ------------------------------------------------------------------------------------------ broken growths
def noise_not_cancelling(rel: float):
    """Every widened matrix gets extra noise on its first input copy only (rel x the block's RMS): no cancellation."""
    def breaks(model, s):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and name.split(".")[-2 if name.endswith("weight") else -1] not in ("embed", "router"):
                    n = p.shape[-1] // s
                    rms = p.double().pow(2).mean().sqrt().item()
                    p[..., :n] += rel * rms * torch.randn(p[..., :n].shape, generator=gen)
    return breaks


def down_proj_not_divided(model, s):
    """Block 0's FFN output copy scaled by s: W.repeat(s, s) instead of W.repeat(s, s) / s."""
    with torch.no_grad():
        ffn = model.blocks[0].ffn
        (ffn.down_proj if isinstance(ffn.down_proj, torch.Tensor) else ffn.down_proj.weight).mul_(s)


def lm_head_off_by(factor: float):
    def breaks(model, s):
        with torch.no_grad():
            model.lm_head.weight.mul_(factor)
    return breaks


def inserted_leaks(rel: float):
    """The first inserted block's o_proj is rel x its source's instead of zero: not an identity."""
    def breaks(model, s):
        layout = [b for b in range(len(model.blocks)) if not model.blocks[b].attention.o_proj.weight.any()]
        with torch.no_grad():
            w = model.blocks[layout[0]].attention.o_proj.weight
            w.copy_(rel * model.blocks[layout[0] - 1].attention.o_proj.weight)
    return breaks


CASES = [  # (name, growth, breaks(model, s) or None)
    ("upcycle E=4", Growth(n_experts=4, top_k=2), None),
    ("width x2", Growth(scale_factor=2), None),
    ("width x3", Growth(scale_factor=3), None),
    ("+2 layers", Growth(extra_layers=2), None),
    ("upcycle + x2 + 2", Growth(n_experts=4, top_k=2, scale_factor=2, extra_layers=2), None),
    ("x2, noise 1.0", Growth(scale_factor=2, noise_std=1.0), None),
    ("BROKEN noise not cancelling 0.3", Growth(scale_factor=2), noise_not_cancelling(0.3)),
    ("BROKEN noise not cancelling 0.03", Growth(scale_factor=2), noise_not_cancelling(0.03)),
    ("BROKEN noise not cancelling 0.01", Growth(scale_factor=2), noise_not_cancelling(0.01)),
    ("BROKEN down_proj copy x s", Growth(scale_factor=2), down_proj_not_divided),
    ("BROKEN lm_head x1.01", Growth(scale_factor=2), lm_head_off_by(1.01)),
    ("BROKEN inserted o_proj 1% leak", Growth(extra_layers=2), inserted_leaks(0.01)),
]


def run(shape: tuple[int, int, int, int], dtype: torch.dtype, root: str) -> None:
    src = os.path.join(root, f"src-{shape[0]}")
    make_source(src, *shape, dtype)
    source = read_source(src)
    model = from_hf(src).eval()
    tokens = byte_token_batch(" ".join(generate_stories(400, seed=0)), 8, 128) % 512
    src_logits = load_logits(src, tokens)
    print(f"\nsource: Llama dim {shape[0]}, {shape[1]} layers, heads {shape[2]}/{shape[3]}, stored in {dtype}")
    print(f"{'growth':<36}{'drift':>10}{'rounding':>10}{'limit':>10}{'fp32-drift':>12}  verdict")
    for name, growth, breaks in CASES:
        grown = grow(model, growth, tokens)[-1].new.eval()
        if breaks:
            breaks(grown, growth.scale_factor)
        with torch.no_grad():
            exact = relative_drift(grown(tokens).float(), model(tokens).float())
        out = os.path.join(root, name.replace(" ", "_"))
        save_checkpoint(grown, source, dtype, out)
        stats = WrittenStats(relative_drift(load_logits(out, tokens), src_logits),
                             rounding_drift(copy.deepcopy(grown), tokens, dtype), str(dtype).removeprefix("torch."))
        verdict = judge_written(stats)
        print(f"{name:<36}{stats.drift:>10.2e}{stats.rounding:>10.2e}{stats.limit:>10.2e}{exact:>12.2e}  "
              f"{'pass' if verdict.passed else 'FAIL'}")


def main(argv: list[str]) -> int:
    import argparse

    from transformers.utils import logging

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="dtype of source and written")
    dtype = DTYPES[p.parse_args(argv).dtype]
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as root:
        for shape in ((64, 2, 4, 2), (256, 8, 8, 4)):
            run(shape, dtype, root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

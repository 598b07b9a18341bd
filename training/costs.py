"""What a model costs, from its config alone (no model is built): parameters, training FLOPs per token, the weights
of a block's matmuls, and a GPU's dense peak FLOP/s. The plan and the roofline both read them."""
from __future__ import annotations

import re

from config import ModelConfig

# ------------------------------------------------------------------------------------------ device speed
# Dense (no sparsity) peak FLOP/s per GPU from the vendors' datasheets: NVIDIA prints tensor figures "with
# sparsity", which are twice these. "fp32" is the TF32 tensor figure: training.parallel.runtime sets allow_tf32, so fp32
# matmuls run as TF32. Patterns are matched in order against torch.cuda.get_device_name(), most specific first.
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"GH200", {"bf16": 989.4e12, "fp32": 494.7e12}),
    (r"H200 NVL", {"bf16": 835.5e12, "fp32": 417.5e12}),
    (r"H200", {"bf16": 989.4e12, "fp32": 494.7e12}),  # SXM
    (r"H100 NVL", {"bf16": 835.5e12, "fp32": 417.5e12}),
    (r"H100 PCIe", {"bf16": 756.5e12, "fp32": 378.0e12}),
    (r"H100", {"bf16": 989.4e12, "fp32": 494.7e12}),  # SXM5, "NVIDIA H100 80GB HBM3"
    (r"B200", {"bf16": 2250e12, "fp32": 1100e12}),
    (r"A100", {"bf16": 312e12, "fp32": 156e12}),  # SXM4 and PCIe, 40 and 80 GB
    (r"L40S", {"bf16": 366.5e12, "fp32": 183e12}),
    (r"L40\b", {"bf16": 181e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp32": 60e12}),
    # No NVIDIA datasheet for the A10G (AWS's GA102 variant of the A10): the A10's figures, not verified.
    (r"A10G", {"bf16": 125e12, "fp32": 62.5e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp32": 62.5e12}),
    (r"RTX 6000 Ada", {"bf16": 364.2e12, "fp32": 182.1e12}),
    (r"RTX 4090", {"bf16": 165.2e12, "fp32": 82.6e12}),  # with fp32 accumulate (what torch uses)
    (r"RTX 3090", {"bf16": 71e12, "fp32": 35.6e12}),
    (r"V100", {"fp32": 15.7e12}),  # no bf16 tensor cores, no TF32
    (r"\bT4\b", {"fp32": 8.1e12}),
)


def peak_flops(gpu_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU at precision "bf16" or "fp32" (TF32 matmuls), or None if unknown."""
    for pattern, peaks in GPU_PEAK_FLOPS:
        if re.search(pattern, gpu_name):
            return peaks.get(precision)
    return None


# ------------------------------------------------------------------------------------------ sizes
def parameter_count(cfg: ModelConfig, active: bool = False) -> int:
    """Transformer.num_parameters(active) from the config alone."""
    D, L = cfg.dim, cfg.n_layers
    total = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + D + L * block_parameters(cfg)
    if active and cfg.is_moe:
        total -= L * (cfg.n_experts - cfg.top_k) * 3 * D * cfg.hidden_dim
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Transformer.flops_per_token(seq_len) from the config alone (its docstring gives the convention)."""
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    matmul = parameter_count(cfg, active=True) - norms - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    return 6 * matmul + 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


def attention_weights(cfg: ModelConfig) -> int:
    q = cfg.n_heads * cfg.head_dim
    return 2 * cfg.dim * q + 2 * cfg.dim * cfg.kv_heads * cfg.head_dim


def block_parameters(cfg: ModelConfig) -> int:
    """Parameters of one block: its two norms and its matrix weights."""
    return 2 * cfg.dim + block_matmul_weights(cfg)


def block_matmul_weights(cfg: ModelConfig) -> int:
    """Matrix weights of one block: attention, then the dense FFN or the router and every expert."""
    ffn = 3 * cfg.dim * cfg.hidden_dim
    return attention_weights(cfg) + (cfg.n_experts * (ffn + cfg.dim) if cfg.is_moe else ffn)

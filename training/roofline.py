"""Expected MFU of a training step from its shapes: a roofline over every matmul plus per-kernel overhead.

    mfu = expected_mfu(cfg, tc, "NVIDIA H100 80GB HBM3", "bf16", compiled=False)   # Estimate(mfu, ...) or None

Each matmul of the step (forward, and backward's two of the same size) takes the longer of its FLOPs at
GEMM_EFFICIENCY of the GPU's peak and its bytes at the GPU's memory bandwidth, so the dim-256..512 matmuls
that sit below the ridge point (peak / bandwidth FLOP per byte) are charged for their traffic. Attention
runs at ATTENTION_EFFICIENCY of peak (fused, causal), elementwise work (norms, residuals, RoPE, SwiGLU, the
MoE's gather and combine, the loss, AdamW) moves its bytes at the bandwidth, and every kernel costs the
larger of its launch gap (GPU side) and the eager per-op host time (CPU side): KERNELS per block are counted
on the project's own step (tests/training/test_roofline.py recounts them). Where bench/gpu_check.sh has measured a
phase's MFU on a GPU and the repo records it in MEASURED_MFU, that figure wins; `Estimate.source` says which.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from config import ModelConfig, TrainConfig
from training.costs import flops_per_token, parameter_count, peak_flops

# HBM bandwidth from the vendors' datasheets (bytes/s), matched like training.costs.GPU_PEAK_FLOPS, in order.
GPU_BANDWIDTH: tuple[tuple[str, float], ...] = (
    (r"GH200", 4.0e12), (r"H200 NVL", 4.8e12), (r"H200", 4.8e12), (r"H100 NVL", 3.9e12), (r"H100 PCIe", 2.0e12),
    (r"H100", 3.35e12), (r"B200", 8.0e12), (r"A100.*80GB", 2.0e12), (r"A100", 1.555e12), (r"L40S", 0.864e12),
    (r"L40\b", 0.864e12), (r"\bL4\b", 0.3e12), (r"A10G", 0.6e12), (r"\bA10\b", 0.6e12),
    (r"RTX 6000 Ada", 0.96e12), (r"RTX 4090", 1.008e12), (r"RTX 3090", 0.936e12),
)
# A large bf16 GEMM's share of the datasheet peak: an 8192^3 bf16 matmul ran at ~790 of 989 TFLOP/s on the
# device machine's H200 (../shared/FACTS.md). Fused attention forward + backward at head_dim 64: assumed.
GEMM_EFFICIENCY, ATTENTION_EFFICIENCY = 0.80, 0.40
# Per kernel: the GPU's gap between queued kernels, and eager PyTorch's host time per op (dispatch, autograd,
# launch), which bounds a step of many small kernels. Assumptions until gpu_check.sh's eager runs are recorded.
LAUNCH_GAP_S, HOST_PER_OP_S = 2e-6, 10e-6
# Non-view aten ops of the eager bf16 training step (forward, backward, clipping, fused AdamW), counted with a
# TorchDispatchMode on this project's model (tests/training/test_roofline.py recounts): per block by kind, and the rest.
KERNELS = {"dense": 124, "moe": 210, "dense_recompute": 49, "moe_recompute": 68, "head_and_optimizer": 60}
# Under torch.compile Inductor fuses the elementwise chains: assumed a third of eager's kernels and half its
# elementwise traffic until gpu_check.sh's compiled-vs-eager figures are recorded.
COMPILED_KERNELS, COMPILED_TRAFFIC = 1 / 3, 1 / 2
# Phase MFU measured by bench/gpu_check.sh (summary.json, phases): {GPU name pattern: {"preset/phase/compile":
# mfu}}. Empty: no GPU has run the check yet.
MEASURED_MFU: dict[str, dict[str, float]] = {}


@dataclass(frozen=True)
class Estimate:
    mfu: float
    source: str  # "roofline" (derived from the shapes) or "measured" (MEASURED_MFU)
    seconds_per_step: float | None = None  # the roofline's time for one optimizer step


def bandwidth(gpu_name: str) -> float | None:
    """The GPU's memory bandwidth in bytes/s, or None when it is not in the table."""
    return next((bw for pattern, bw in GPU_BANDWIDTH if re.search(pattern, gpu_name)), None)


def measured_mfu(gpu_name: str, key: str) -> float | None:
    """The MFU gpu_check.sh measured for this GPU and `preset/phase/compile` key, if the repo records one."""
    for pattern, figures in MEASURED_MFU.items():
        if re.search(pattern, gpu_name) and key in figures:
            return figures[key]
    return None


def _matmul_s(m: float, n: float, k: float, peak: float, bw: float, bytes_per: int = 2) -> float:
    """Roofline time of an (m x k) @ (k x n) matmul: FLOPs at the GEMM rate or bytes at the bandwidth."""
    return max(2 * m * n * k / (peak * GEMM_EFFICIENCY), bytes_per * (m * k + k * n + m * n) / bw)


def block_matmul_s(cfg: ModelConfig, tokens: int, peak: float, bw: float) -> float:
    """Forward matmul time of one block over `tokens` tokens (attention projections, FFN or experts)."""
    D, F, q, kv = cfg.dim, cfg.hidden_dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    t = _matmul_s(tokens, q, D, peak, bw) + 2 * _matmul_s(tokens, kv, D, peak, bw) + _matmul_s(tokens, D, q, peak, bw)
    if not cfg.is_moe:
        return t + 2 * _matmul_s(tokens, F, D, peak, bw) + _matmul_s(tokens, D, F, peak, bw)
    per_expert = tokens * cfg.top_k / cfg.n_experts  # balanced routing
    experts = cfg.n_experts * (2 * _matmul_s(per_expert, F, D, peak, bw) + _matmul_s(per_expert, D, F, peak, bw))
    return t + _matmul_s(tokens, cfg.n_experts, D, peak, bw) + experts


def elementwise_bytes(cfg: ModelConfig, tokens: int) -> float:
    """Forward bytes of the non-matmul ops of one block: norms, residuals, RoPE, SwiGLU, MoE gather/combine."""
    D, F, k = cfg.dim, cfg.hidden_dim, cfg.top_k if cfg.is_moe else 1
    per_token = 12 * D + 20 * D + 24 * D + 10 * F * k  # norms 2x(4D+2D), residuals 2x(4D+2D+4D), RoPE, SiLU * up
    if cfg.is_moe:
        per_token += 16 * k * D + 12 * cfg.n_experts  # gather, weight, combine; router softmax / top-k
    return per_token * tokens


def step_seconds(cfg: ModelConfig, tc: TrainConfig, peak: float, bw: float, compiled: bool) -> float:
    """Roofline time of one optimizer step: grad_accum_steps micro-batches + clipping + AdamW."""
    tokens, T, L = tc.batch_size * tc.seq_len, tc.seq_len, cfg.n_layers
    recompute = tc.activation_checkpointing
    passes = 3 + (1 if recompute else 0)  # forward, backward's two matmuls each (+ the recomputed forward)
    matmul = L * passes * block_matmul_s(cfg, tokens, peak, bw) + 3 * _matmul_s(tokens, cfg.vocab_size, cfg.dim,
                                                                                 peak, bw)
    attn_flops = 4 * tc.batch_size * T * T * cfg.n_heads * cfg.head_dim * 0.5 * (1 + 2.5 + (1 if recompute else 0))
    attention = L * attn_flops / (peak * ATTENTION_EFFICIENCY)
    traffic = (L * (3 + recompute) * elementwise_bytes(cfg, tokens) + 48 * cfg.vocab_size * tokens)
    kind = "moe" if cfg.is_moe else "dense"
    kernels = L * (KERNELS[kind] + (KERNELS[f"{kind}_recompute"] if recompute else 0)) + KERNELS["head_and_optimizer"]
    if compiled:
        traffic, kernels = traffic * COMPILED_TRAFFIC, kernels * COMPILED_KERNELS
    gpu = matmul + attention + traffic / bw + kernels * LAUNCH_GAP_S
    micro = max(gpu, kernels * HOST_PER_OP_S)  # eager: the host cannot queue kernels faster than it dispatches
    params = _parameters(cfg)
    return tc.grad_accum_steps * micro + 40 * params / bw  # AdamW reads/writes 28 B a parameter, clipping 12


def _parameters(cfg: ModelConfig) -> int:
    return parameter_count(cfg)


def expected_mfu(cfg: ModelConfig, tc: TrainConfig, gpu_name: str, precision: str, compiled: bool = False,
                 key: str | None = None) -> Estimate | None:
    """The phase's expected MFU: a measured figure for this GPU and key when recorded, else the roofline's."""
    measured = measured_mfu(gpu_name, key) if key else None
    if measured is not None:
        return Estimate(measured, "measured")
    peak, bw = peak_flops(gpu_name, precision), bandwidth(gpu_name)
    if not peak or not bw:
        return None
    seconds = step_seconds(cfg, tc, peak, bw, compiled)
    flops = flops_per_token(cfg, tc.seq_len) * tc.batch_size * tc.seq_len * tc.grad_accum_steps
    return Estimate(flops / seconds / peak, "roofline", seconds)

"""One Llama-style decoder for every phase: dense (n_experts=0) or mixture-of-experts (n_experts>0).

    model = build_model(ModelConfig(dim=256, n_layers=4, n_heads=4))
    logits = model(tokens)                          # (B, T, vocab_size)
    out = model(tokens, return_details=True)        # + hidden states and router logits per layer

Pre-norm blocks: RMSNorm -> causal self-attention (RoPE in Hugging Face Llama's rotate-half convention,
scaled_dot_product_attention) -> residual; RMSNorm -> SwiGLU or MoE FFN -> residual. Final RMSNorm, LM head.
The transformers families' features are config switches of the same blocks (config.py): q/k/v biases (Qwen2),
RMSNorm of queries and keys over head_dim before RoPE (Qwen3), an explicit head_dim, a sliding attention window
(Mistral) and Llama 3's scaled RoPE frequencies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from config import ModelConfig
from models.moe import MoEFeedForward


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in at least fp32 (bf16 under autocast loses too much), as HF Llama does.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return _to_compute_dtype(self.weight * xf.to(x.dtype))


def _to_compute_dtype(t: Tensor) -> Tensor:
    """t in autocast's dtype where autocast is on: the norm's output is cast once here, not once by each of the
    projections that read it (q, k, v; gate, up, router). Outside autocast t is returned as it is."""
    return t.to(_compute_dtype(t))


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Autocast's dtype where it is on (float64 is never autocast), else t's."""
    if torch.is_autocast_enabled(t.device.type) and t.dtype != torch.float64:
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                scaling: dict | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin tables (max_seq_len, head_dim) in HF Llama's layout: frequencies repeated over both halves;
    `scaling` is Llama 3's frequency scaling (config.py's rope_scaling) or None."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def llama3_inv_freq(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3's scaled inverse frequencies, in transformers' order of float32 operations (bit-equal): wavelengths
    longer than original/low_freq_factor slow down by `factor`, shorter than original/high_freq_factor stay,
    and those between are interpolated smoothly."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def attention_mask(T: int, sliding_window: int | None, device: torch.device) -> Tensor:
    """(T, T) bool, True where query i may read key j: j <= i, and j > i - W within a sliding window W
    (transformers' convention: a token sees itself and the W - 1 tokens before it)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    allowed = j <= i
    return allowed & (j > i - sliding_window) if sliding_window is not None else allowed


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: x (B, H, T, hd); pairs are (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:  # one (head_dim,) weight shared by every head, as Qwen3's q_norm / k_norm
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, H, T, hd) and keys/values expanded to H heads, RoPE applied to q and k."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:T].to(q.dtype), sin[:T].to(q.dtype)  # RoPE in the projections' dtype (bf16 under autocast)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # query head i reads kv head i // group
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return q, k, v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k, v = self.qkv(x, cos, sin)
        T = x.shape[1]
        if self.sliding_window is not None and T > self.sliding_window:  # the window cuts: an explicit mask
            mask = attention_mask(T, self.sliding_window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        else:  # the window holds the whole sequence: plain causal, SDPA's fastest path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def attention_probs(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Explicit causal (windowed) softmax(q k^T / sqrt(hd)), (B, H, T, T): the reference the RoPE check reads."""
        q, k, _ = self.qkv(x, cos, sin)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        allowed = attention_mask(x.shape[1], self.sliding_window, x.device)
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


class FeedForward(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.is_moe:
            self.ffn = MoEFeedForward(cfg.dim, cfg.hidden_dim, cfg.n_experts, cfg.top_k)
        else:
            self.ffn = FeedForward(cfg.dim, cfg.hidden_dim)

    def attention_residual(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The residual stream after the attention half of the block (the FFN's upstream state)."""
        return x + self.attention(self.attention_norm(x), cos, sin)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.attention_residual(x, cos, sin)
        ffn_out, router_logits = self.ffn(self.ffn_norm(h))
        return h + ffn_out, router_logits


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    hidden_states: list[Tensor] = field(default_factory=list)  # embedding output, then each block's output
    router_logits: list[Tensor] = field(default_factory=list)  # one (B*T, E) per MoE block


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # A training choice, not architecture: growth, checkpoints and export never see it.
        self.activation_checkpointing = False  # recompute each block in backward instead of keeping its activations
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers); norms 1,
        biases 0."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, tokens: Tensor, return_details: bool = False) -> Tensor | ModelOutput:
        """tokens (B, T) int64 -> logits (B, T, V), or a ModelOutput with per-layer states when asked."""
        T = tokens.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embed(tokens)
        hidden_states, router_logits = [x], []
        dtype = _compute_dtype(x)  # one cast of the RoPE tables per forward, not two per block
        cos, sin = self.rope_cos[:T].to(dtype), self.rope_sin[:T].to(dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # keeps only the block's input; non-reentrant: works with compile, DDP and autocast
                x, logits = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, logits = block(x, cos, sin)
            hidden_states.append(x)
            if logits is not None:
                router_logits.append(logits)
        logits = self.lm_head(self.norm(x))
        if not return_details:
            return logits
        return ModelOutput(logits, hidden_states, router_logits)

    def num_parameters(self, active: bool = False) -> int:
        """Unique parameters; with active=True, those one token uses (top_k of n_experts experts)."""
        total = sum(p.numel() for p in self.parameters())
        cfg = self.config
        if active and cfg.is_moe:
            per_expert = 3 * cfg.dim * cfg.hidden_dim
            total -= cfg.n_layers * (cfg.n_experts - cfg.top_k) * per_expert
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6 x matmul weights a token uses + attention.

        Norm weights, biases and the embedding lookup are not matmuls (a tied table counts once, as the LM head);
        attention scores and weighted values add 12 x layers x seq_len x dim, PaLM's convention (no causal discount).
        """
        cfg = self.config
        norms = sum(p.numel() for p in self.parameters() if p.dim() == 1)  # norm weights and q/k/v biases
        matmul = self.num_parameters(active=True) - norms - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
        return 6 * matmul + 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


def build_model(cfg: ModelConfig) -> Transformer:
    """The one constructor for every phase."""
    return Transformer(cfg)


def model_holding(cfg: ModelConfig, state: dict[str, Tensor]) -> Transformer:
    """A model of cfg whose parameters are `state`'s tensors themselves (strict names and shapes): no initialised
    copy is made first, so a grown model of billions of parameters is held once. Its RoPE tables take the
    weights' device and dtype, as build_model(cfg).to(device, dtype) would give them."""
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    like = model.embed.weight
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    model.rope_cos, model.rope_sin = cos.to(like.device, like.dtype), sin.to(like.device, like.dtype)
    return model

"""Mixture-of-experts FFN: softmax router -> top-k -> renormalise (Mixtral), dropless, grouped by expert.

With identical experts the output equals the dense FFN's exactly, because the kept weights sum to 1.
The training losses (Switch balance loss, router z-loss) are computed from the router logits the layer
returns, outside the layer, as Mixtral does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def route(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Combine weights (N, k), renormalised to sum to 1, and chosen expert ids (N, k)."""
    probs = _at_least_fp32(router_logits).softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def expert_load(router_logits: Tensor, top_k: int) -> Tensor:
    """Tokens routed to each expert, (E,) int64."""
    _, experts = route(router_logits, top_k)
    return torch.bincount(experts.flatten(), minlength=router_logits.shape[-1])


def load_balancing_loss(router_logits: Tensor, top_k: int) -> Tensor:
    """Switch balance loss E * sum_i f_i * P_i, normalised so perfect balance reads 1.0 (Megatron's scale)."""
    n_experts = router_logits.shape[-1]
    probs = _at_least_fp32(router_logits).softmax(dim=-1)
    frac_assigned = expert_load(router_logits, top_k).to(probs.dtype) / (router_logits.shape[0] * top_k)
    return n_experts * (frac_assigned * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """mean(logsumexp(logits)^2): keeps router logits small (ST-MoE)."""
    return _at_least_fp32(router_logits).logsumexp(dim=-1).square().mean()


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def load_entropy(counts: Tensor) -> float:
    """Entropy of the per-expert load divided by ln(E): 1.0 is perfectly balanced, 0 all on one expert."""
    p = counts.double() / counts.sum().clamp(min=1)
    h = -(p * p.clamp(min=1e-300).log()).sum().item()
    return h / math.log(len(counts)) if len(counts) > 1 else 1.0


class MoEFeedForward(nn.Module):
    """n_experts SwiGLU experts stored as stacked tensors; tokens are sorted by expert, one matmul group each."""

    def __init__(self, dim: int, ffn_dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        # (E, out, in) like nn.Linear weights, so every expert is an ordinary SwiGLU.
        self.gate_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> output (B, T, D) and router logits (B*T, E)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        router_logits = self.router(x)  # (N, E)
        weights, experts = route(router_logits, self.top_k)  # (N, k)
        flat_experts = experts.flatten()  # (N*k,)
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k  # token index of each sorted assignment
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        y_sorted = _expert_outputs(x[token_of], counts, self.gate_proj, self.up_proj, self.down_proj)
        y_sorted = y_sorted * weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token_of, y_sorted)
        return y.reshape(shape), router_logits


# Eager even inside torch.compile: the split sizes change every step, so a traced loop would recompile (or run
# as many small dynamic-shape graphs) each step; measured on CPU, compiled 1.5x slower than eager at micro size.
@torch.compiler.disable
def _expert_outputs(x_sorted: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """SwiGLU of each expert over its contiguous segment of the expert-sorted tokens, (N*k, D)."""
    # unbind once: indexing the stacked weights per expert would make backward write a full-size zero
    # gradient for every expert (E^2 memory traffic, most of the layer's time at 16 experts).
    gates, ups, downs = gate.unbind(0), up.unbind(0), down.unbind(0)
    outs = []
    for e, segment in enumerate(x_sorted.split(counts.tolist())):
        if segment.shape[0]:
            h = F.silu(segment @ gates[e].t()) * (segment @ ups[e].t())
            outs.append(h @ downs[e].t())
    return torch.cat(outs)

"""Function-preserving relabellings of a grown model, for the tests: heads (kv heads with their query groups),
FFN neurons, experts, residual dimensions. Each returns a new model computing exactly what the input computes."""
from __future__ import annotations

import copy

import torch
from torch import nn


def head_permutation(n_heads: int, n_kv: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(query order, kv order): new query head p holds old head q[p]; kv groups move together."""
    g = n_heads // n_kv
    kv = torch.randperm(n_kv, generator=gen)
    q = torch.cat([kv[p] * g + torch.randperm(g, generator=gen) for p in range(n_kv)])
    return q, kv


def _rows(w: torch.Tensor, order: torch.Tensor, size: int) -> torch.Tensor:
    return w.view(len(order), size, *w.shape[1:])[order].reshape(w.shape)


@torch.no_grad()
def relabel_heads(model: nn.Module, seed: int = 0, consistent: bool = True) -> nn.Module:
    """Every block's heads permuted: q, k, v rows and o_proj columns (consistent=False leaves o_proj alone)."""
    m, cfg, gen = copy.deepcopy(model), model.config, torch.Generator().manual_seed(seed)
    hd = cfg.head_dim
    for b in m.blocks:
        a = b.attention
        q, kv = head_permutation(cfg.n_heads, cfg.kv_heads, gen)
        a.q_proj.weight.copy_(_rows(a.q_proj.weight, q, hd))
        a.k_proj.weight.copy_(_rows(a.k_proj.weight, kv, hd))
        a.v_proj.weight.copy_(_rows(a.v_proj.weight, kv, hd))
        if consistent:
            a.o_proj.weight.copy_(_rows(a.o_proj.weight.t(), q, hd).t())
    return m


@torch.no_grad()
def relabel_neurons(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every block's FFN neurons permuted (gate, up rows and down columns; each expert its own permutation)."""
    m, gen = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    for b in m.blocks:
        f = b.ffn
        if m.config.is_moe:
            for e in range(m.config.n_experts):
                p = torch.randperm(f.gate_proj.shape[1], generator=gen)
                f.gate_proj[e] = f.gate_proj[e][p]
                f.up_proj[e] = f.up_proj[e][p]
                f.down_proj[e] = f.down_proj[e][:, p]
        else:
            p = torch.randperm(f.gate_proj.weight.shape[0], generator=gen)
            f.gate_proj.weight.copy_(f.gate_proj.weight[p])
            f.up_proj.weight.copy_(f.up_proj.weight[p])
            f.down_proj.weight.copy_(f.down_proj.weight[:, p])
    return m


@torch.no_grad()
def relabel_experts(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every MoE block's experts permuted, router rows with them."""
    m, gen = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    for b in m.blocks:
        p = torch.randperm(m.config.n_experts, generator=gen)
        f = b.ffn
        for w in (f.gate_proj, f.up_proj, f.down_proj, f.router.weight):
            w.copy_(w[p])
    return m


@torch.no_grad()
def permute_residual(model: nn.Module, order: torch.Tensor) -> nn.Module:
    """The residual stream's dimensions reordered (new dim i is old dim order[i]) in every weight that reads or
    writes it: a tiled model becomes interleaved with order = arange(D).view(s, n).t().flatten()."""
    m = copy.deepcopy(model)
    for name, p in m.named_parameters():
        key = name.removesuffix(".weight").split(".")[-1]
        if name == "embed.weight":
            p.copy_(p[:, order])
        elif p.dim() == 1:
            p.copy_(p[order])
        elif key in ("o_proj", "down_proj"):
            p.copy_(p[..., order, :])
        else:  # q, k, v, gate, up, router, lm_head read the residual stream
            p.copy_(p[..., order])
    return m


def interleave_order(dim: int, s: int) -> torch.Tensor:
    """new dim u*s + c is old (tiled) dim u + n*c."""
    return torch.arange(dim).view(s, dim // s).t().flatten()

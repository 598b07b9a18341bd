"""Which units of a widened model are copies of one another, found by what they compute rather than by position.

The project tiles (copy c of unit u is unit u + n*c); other tools interleave (u*s + c) or relabel heads, neurons
and experts. A grouping is a LongTensor (s, n): column u lists the s units that are copies of one unit, row c the
c-th copy of each. The residual grouping comes from the embedding's columns (copies are equal columns); every
other family compares rows folded over the residual copies (the weight a row applies to a tiled input), so
cancelling symmetry-breaking noise does not hide a copy. Positional tiling is tried first (cheap, and the
project's layout); nearest-neighbour grouping only when it does not fit.

    groups = residual_groups(model.embed.weight, s)        # (s, dim // s) or None
    folded = fold(w, groups)                               # (out, dim // s): w summed over residual copies
    heads = group_copies(unit_signatures(folded, n_heads), s)
"""
from __future__ import annotations

import torch
from torch import Tensor

COPY_DISTANCE = 0.5  # relative distance under which two units count as copies (copies ~1e-8..0.1, others ~1.4)
SIGNATURE_DIMS = 32  # random projections a unit's weights are compared on: cheap, and exact copies stay exact


def positional(s: int, n: int, device=None) -> Tensor:
    """The project's layout: copy c of unit u is unit u + n*c, as (s, n)."""
    return torch.arange(s * n, device=device).view(s, n)


_PROJECTIONS: dict[tuple[int, int, str], Tensor] = {}  # drawn once per size and device: a few KB each


def _projection(k: int, dim: int, like: Tensor) -> Tensor:
    """(dim, k) fixed random directions (seeded by the sizes); drawing them was a seventh of the clone grouping."""
    key = (k, dim, str(like.device))
    if key not in _PROJECTIONS:
        if len(_PROJECTIONS) > 64:
            _PROJECTIONS.clear()
        gen = torch.Generator().manual_seed(k * 7919 + dim)
        _PROJECTIONS[key] = torch.randn(dim, k, generator=gen, dtype=torch.float64).to(device=like.device)
    return _PROJECTIONS[key]


def unit_signatures(w: Tensor, n_units: int) -> Tensor:
    """(n_units, SIGNATURE_DIMS): each unit's weights (w split into n_units equal row blocks) projected on fixed
    random directions, so copies compare in O(n^2 k) whatever their size."""
    x = w.detach().double().reshape(n_units, -1)
    if x.shape[1] <= SIGNATURE_DIMS:
        return x
    return x @ _projection(SIGNATURE_DIMS, x.shape[1], x)


def _relative(a: Tensor, b: Tensor) -> Tensor:
    """||a - b|| / mean(||a||, ||b||) row-wise; 0 where both are zero."""
    scale = (a.norm(dim=-1) + b.norm(dim=-1)) / 2
    return (a - b).norm(dim=-1) / scale.clamp(min=1e-300) * (scale > 0)


def positional_distance(sig: Tensor, s: int) -> float:
    """Largest relative distance between positional copies (u, u + n*c) of the units' signatures."""
    x = sig.view(s, -1, sig.shape[-1])
    return max((_relative(x[0], x[c]).max().item() for c in range(1, s)), default=0.0)


def group_copies(sig: Tensor, s: int, threshold: float = COPY_DISTANCE) -> Tensor | None:
    """(s, n) grouping of N = s*n units into sets of s mutual copies, or None when the units do not form such
    sets. Positional tiling when it fits; else each unit's s-1 nearest neighbours, kept only if consistent."""
    N = sig.shape[0]
    if s == 1:
        return positional(1, N, sig.device)
    if N % s:
        return None
    if positional_distance(sig, s) < threshold:
        return positional(s, N // s, sig.device)
    scale = sig.norm(dim=-1)
    d = torch.cdist(sig, sig) / ((scale[:, None] + scale[None, :]) / 2).clamp(min=1e-300)
    d.fill_diagonal_(float("inf"))
    near = d.topk(s - 1, largest=False).indices  # (N, s-1)
    groups, seen = [], torch.zeros(N, dtype=torch.bool)
    for u in range(N):
        if seen[u]:
            continue
        members = torch.cat([torch.tensor([u], device=near.device), near[u]]).sort().values
        if seen[members].any() or d[members][:, members].masked_fill(torch.eye(s, dtype=torch.bool,
                                                                              device=d.device), 0).max() > threshold:
            return None
        seen[members] = True
        groups.append(members)
    return torch.stack(groups, dim=1)  # (s, n)


def residual_groups(embed: Tensor, s: int, threshold: float = 1e-6) -> Tensor | None:
    """(s, dim // s) grouping of the residual dimensions: copies are equal embedding columns (the embedding tiles
    without division), within `threshold` relative (default: up to rounding, as right after growth). None when
    the columns do not come in s such copies."""
    if s == 1:
        return positional(1, embed.shape[1], embed.device)
    return group_copies(unit_signatures(embed.t(), embed.shape[1]), s, threshold=threshold)


def fold(w: Tensor, groups: Tensor) -> Tensor:
    """w (..., s*n) summed over the s copies of each residual dimension: (..., n), the weight each row applies to
    an input that is tiled in this grouping. Promoted to at least fp32, so small differences are not rounded away."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    return w[..., groups].sum(-2)


def tiling_index(groups: Tensor) -> Tensor:
    """(s*n,) the old dimension each new dimension copies: x_new = x_old[..., index] is the tiled input."""
    index = torch.empty(groups.numel(), dtype=torch.long, device=groups.device)
    index[groups.flatten()] = torch.arange(groups.shape[1], device=groups.device).repeat(groups.shape[0])
    return index


def describe_grouping(groups: Tensor) -> str:
    """"tiled" (u + n*c), "interleaved" (u*s + c) or "relabelled" for a (s, n) grouping."""
    s, n = groups.shape
    if torch.equal(groups, positional(s, n, groups.device)):
        return "tiled (copy c of unit u is u + n*c)"
    if torch.equal(groups, torch.arange(s * n, device=groups.device).view(n, s).t()):
        return "interleaved (copy c of unit u is u*s + c)"
    return "relabelled (copies found by matching weights)"


def residual_map(old_embed: Tensor, new_embed: Tensor, s: int, tolerance: float = 1e-6) -> Tensor | None:
    """(s, dim_old) grouping whose column d lists the new residual dimensions that copy old dimension d (their
    embedding columns equal old column d within tolerance, relative); None if the new embedding is no such copy."""
    D = old_embed.shape[1]
    if new_embed.shape[1] != s * D:
        return None
    old_sig, new_sig = unit_signatures(old_embed.t(), D), unit_signatures(new_embed.t(), s * D)
    if _relative(new_sig, old_sig.repeat(s, 1)).max() <= tolerance:
        return positional(s, D, new_embed.device)
    d = torch.cdist(new_sig, old_sig) / old_sig.norm(dim=-1).clamp(min=1e-300)[None, :]
    best, src = d.min(dim=1)
    if best.max() > tolerance or not torch.equal(torch.bincount(src, minlength=D), torch.full((D,), s, device=src.device)):
        return None
    return torch.stack([(src == j).nonzero().flatten() for j in range(D)], dim=1)  # (s, D)


class CloneGroups:
    """The copy groups of a model widened by s, found from its own weights: residual (s, dim/s); per block, query
    heads (s, H/s), kv heads (s, KV/s) or None (a single shared KV head kept), FFN neurons (s, F/s), one grouping
    per expert for an MoE. `found` is False where some family was not s-fold copies (positional used instead)."""

    def __init__(self, model, s: int):
        cfg, self.s, self.found = model.config, s, True
        # Copies as far apart as training takes them (COPY_DISTANCE), not only exact ones: divergence reads this.
        self.residual = self._or_positional(residual_groups(model.embed.weight.detach(), s, COPY_DISTANCE), cfg.dim)
        self.heads, self.kv_heads, self.neurons = [], [], []
        for b in model.blocks:
            a, f = b.attention, b.ffn
            self.heads.append(self._rows(a.q_proj.weight, cfg.n_heads))
            self.kv_heads.append(self._rows(a.k_proj.weight, cfg.kv_heads) if cfg.kv_heads % s == 0 else None)
            if cfg.is_moe:
                self.neurons.append([self._rows(torch.cat([g, u], 1), cfg.hidden_dim)
                                     for g, u in zip(f.gate_proj, f.up_proj)])
            else:
                self.neurons.append(self._rows(torch.cat([f.gate_proj.weight, f.up_proj.weight], 1), cfg.hidden_dim))

    def _or_positional(self, groups: Tensor | None, n: int) -> Tensor:
        if groups is None:
            self.found = False
            return positional(self.s, n // self.s)
        return groups

    def _rows(self, w: Tensor, n_units: int) -> Tensor | None:
        """Group n_units row blocks of w (inputs in the residual layout, possibly several concatenated); None when
        n_units is no multiple of s (heads not grown with the width: the RoPE check reports it)."""
        if n_units % self.s:
            self.found = False
            return None
        D = self.residual.numel()
        folded = torch.cat([fold(part, self.residual) for part in w.detach().split(D, dim=-1)], dim=-1)
        return self._or_positional(group_copies(unit_signatures(folded, n_units), self.s), n_units)

    def layout(self) -> str:
        """How the copies are laid out, in words: residual, then the first block's heads and (first expert's)
        neurons."""
        parts = [f"residual {describe_grouping(self.residual)}"]
        if self.heads:
            first = self.neurons[0][0] if isinstance(self.neurons[0], list) else self.neurons[0]
            for name, g in (("heads", self.heads[0]), ("FFN neurons", first)):
                parts.append(f"{name} {describe_grouping(g) if g is not None else 'not a multiple of the width factor'}")
        return "; ".join(parts)


def by_groups(t: Tensor, groups: Tensor) -> Tensor:
    """t (N * r, ...) holding N units of r rows each -> (s, n, r * ...): the copies of each unit side by side."""
    return t.reshape(groups.numel(), -1)[groups]

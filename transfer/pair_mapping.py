"""How a BIG model was grown from a SMALL one, read off their configs and weights: the width factor and head
layout, which BIG block copies which SMALL block and which blocks were inserted, dense -> MoE. The checks are then
run with that block layout, so a pair grown by another tool (LLaMA-Pro expansion, mergekit-moe, HyperCloning) is
judged by what it is, not by where this project would have put things.

    mapping = infer_mapping(small, big)       # GrowthMapping, or NotAPair(reason) raised before any work
    print(mapping.describe())
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from transfer.checks.clones import CloneGroups, fold, positional, residual_map, tiling_index

MATCH_TOLERANCE = 1e-4  # relative distance under which a BIG block's attention counts as a copy of a SMALL block's


class NotAPair(ValueError):
    """SMALL and BIG cannot be judged as a grown pair; the message is one line saying why."""


@dataclass
class BlockSource:
    big: int
    copies: int | None  # the SMALL block whose attention weights it copies, None if it copies none
    inserted: bool
    identity: bool  # o_proj and every down_proj exactly zero: adds nothing to the residual stream
    after: int  # the last original (non-inserted) block before it: what its input is


@dataclass
class GrowthMapping:
    scale: int
    small_cfg: object
    big_cfg: object
    blocks: list[BlockSource] = field(default_factory=list)
    layout_note: str = ""
    expert_note: str = ""

    @property
    def layout(self) -> list[tuple[int, bool]]:
        """The checks' layout: (SMALL block whose output a BIG block's input is / it copies, inserted)."""
        return [(b.copies if not b.inserted else b.after, b.inserted) for b in self.blocks]

    @property
    def upcycling(self) -> bool:
        """Dense -> MoE at the same width and depth: the upcycling checks apply."""
        s, b = self.small_cfg, self.big_cfg
        return not s.is_moe and b.is_moe and self.scale == 1 and s.n_layers == b.n_layers

    def describe(self) -> str:
        s, b = self.small_cfg, self.big_cfg
        lines = ["MAPPING (inferred from the configs and weights)",
                 f"  width x{self.scale}: dim {s.dim} -> {b.dim}, heads {s.n_heads}/{s.kv_heads} -> {b.n_heads}/{b.kv_heads} "
                 f"(q/kv), head_dim {s.head_dim} -> {b.head_dim}, FFN {s.hidden_dim} -> {b.hidden_dim}"]
        features = attention_features(s)
        if features != attention_features(b):
            lines.append(f"  attention features differ: SMALL {features}, BIG {attention_features(b)}")
        elif features != "plain":
            lines.append(f"  attention (both): {features}")
        if self.layout_note:
            lines.append(f"  copies laid out: {self.layout_note}")
        lines.append(f"  FFN: {self.expert_note}")
        lines.append(f"  depth {s.n_layers} -> {b.n_layers}:")
        for blk in self.blocks:
            src = "copies no SMALL block" if blk.copies is None else f"copies SMALL block {blk.copies}"
            kind = "inserted" if blk.inserted else "original"
            ident = ", identity (o_proj and down_proj zero)" if blk.identity else ""
            after = f", after SMALL block {blk.after}" if blk.inserted else ""
            lines.append(f"    BIG block {blk.big}: {kind}, {src}{after}{ident}")
        return "\n".join(lines)


def attention_features(cfg) -> str:
    """The transformers families' attention features a config has, in words ("plain" for none)."""
    parts = [name for name, on in (("q/k/v biases", cfg.qkv_bias), ("q/k norms", cfg.qk_norm)) if on]
    if cfg.explicit_head_dim is not None:
        parts.append(f"explicit head_dim {cfg.head_dim}")
    if cfg.sliding_window is not None:
        parts.append(f"sliding window {cfg.sliding_window}")
    if cfg.rope_scaling is not None:
        parts.append(f"llama3 RoPE scaling x{cfg.rope_scaling['factor']:g}")
    return ", ".join(parts) or "plain"


def pair_problem(s, b) -> str | None:
    """Why SMALL and BIG configs cannot be judged as a grown pair at all (exit 2), or None."""
    if s.vocab_size != b.vocab_size:
        return f"different vocabularies: SMALL has {s.vocab_size} tokens, BIG {b.vocab_size}"
    if b.dim % s.dim:
        return f"width factor {b.dim}/{s.dim} = {b.dim / s.dim:.3g} is not an integer"
    if b.n_layers < s.n_layers:
        return f"BIG has fewer blocks ({b.n_layers}) than SMALL ({s.n_layers})"
    if b.max_seq_len < s.max_seq_len:
        return f"BIG's context ({b.max_seq_len}) is shorter than SMALL's ({s.max_seq_len})"
    if s.is_moe and not b.is_moe:
        return "SMALL is a mixture of experts and BIG is dense: not a growth"
    return None


def _gram_signature(block: nn.Module, groups: Tensor, rows: tuple[int, int]) -> Tensor:
    """What a block's attention computes on a tiled input, whatever the order of its heads: the Gram matrices of
    its q and k weights folded over the residual copies, divided by how many times each SMALL row is there
    (`rows`: q and k rows of the SMALL block), so a widened or relabelled copy reads as its source."""
    a, parts = block.attention, []
    for w, n in zip((a.q_proj.weight, a.k_proj.weight), rows):
        f = fold(w.detach().double(), groups)  # (rows, dim_small)
        parts.append((f.t() @ f).flatten() * (n / w.shape[0]))
    return torch.cat(parts)


def _norm_distance(big_w: Tensor, small_w: Tensor, index: Tensor) -> float:
    ref = small_w.detach().double()[index]
    return ((big_w.detach().double() - ref).norm() / ref.norm().clamp(min=1e-300)).item()


def _is_identity(block: nn.Module) -> bool:
    f = block.ffn
    down = f.down_proj if isinstance(f.down_proj, Tensor) else f.down_proj.weight
    return not bool(block.attention.o_proj.weight.any()) and not bool(down.any())


def _distances(small: nn.Module, big: nn.Module, groups: Tensor) -> Tensor:
    """(BIG blocks, SMALL blocks) relative distance of attention signatures plus attention-norm weights."""
    index, c = tiling_index(groups), small.config
    rows = (c.n_heads * c.head_dim, c.kv_heads * c.head_dim)
    small_sigs = [_gram_signature(b, positional(1, c.dim), rows) for b in small.blocks]
    d = torch.empty(len(big.blocks), len(small.blocks), dtype=torch.float64)
    for j, bb in enumerate(big.blocks):
        sig = _gram_signature(bb, groups, rows)
        for i, sb in enumerate(small.blocks):
            ref = small_sigs[i]
            d[j, i] = ((sig - ref).norm() / ref.norm().clamp(min=1e-300)).item() + _norm_distance(
                bb.attention_norm.weight, sb.attention_norm.weight, index)
    return d


def infer_blocks(small: nn.Module, big: nn.Module, groups: Tensor) -> list[BlockSource]:
    """Which BIG block is which: SMALL's blocks must appear in order (one BIG block each, a non-identity one where
    a block and its identity copy both match); every other BIG block is inserted after the original before it."""
    d = _distances(small, big, groups)
    best_d, best = d.min(dim=1)
    identity = [_is_identity(b) for b in big.blocks]
    chosen, j0 = {}, 0
    for i in range(len(small.blocks)):
        candidates = [j for j in range(j0, len(big.blocks)) if best[j] == i and best_d[j] <= MATCH_TOLERANCE]
        if not candidates:  # SMALL block i copied nowhere: take the BIG block closest to it, in order
            left = len(small.blocks) - i - 1
            pool = range(j0, len(big.blocks) - left)
            candidates = [min(pool, key=lambda j: d[j, i].item())]
        j = next((c for c in candidates if not identity[c]), candidates[0])
        chosen[j], j0 = i, j + 1
    blocks, last = [], None
    for j in range(len(big.blocks)):
        copies = int(best[j]) if best_d[j] <= MATCH_TOLERANCE else None
        if j in chosen:
            last = chosen[j]
            blocks.append(BlockSource(j, chosen[j], False, identity[j], chosen[j]))
        else:
            if last is None:
                raise NotAPair(f"BIG block {j} comes before every block that copies SMALL's first block: an inserted "
                               f"block must follow an original one")
            blocks.append(BlockSource(j, copies, True, identity[j], last))
    return blocks


def _expert_note(small: nn.Module, big: nn.Module, blocks: list[BlockSource]) -> str:
    """The FFN's growth in words; for dense -> MoE at one width, how many experts copy SMALL's MLP exactly."""
    s, b = small.config, big.config
    if not b.is_moe:
        return f"dense, {s.hidden_dim} -> {b.hidden_dim} neurons"
    if s.is_moe:
        return f"{s.n_experts} -> {b.n_experts} experts, top-{s.top_k} -> top-{b.top_k}"
    note = f"dense -> {b.n_experts} experts, top-{b.top_k}"
    if big.config.dim != small.config.dim:
        return note
    copies = []
    for blk in blocks:
        if not blk.inserted and blk.copies is not None:
            dense, moe = small.blocks[blk.copies].ffn, big.blocks[blk.big].ffn
            same = [all(torch.equal(getattr(moe, n)[e].detach(), getattr(dense, n).weight.detach())
                        for n in ("gate_proj", "up_proj", "down_proj")) for e in range(b.n_experts)]
            copies.append(sum(same))
    if not copies:
        return note
    counts = f"{min(copies)}" if min(copies) == max(copies) else f"{min(copies)}-{max(copies)}"
    return f"{note}; experts that are exact copies of SMALL's MLP: {counts} of {b.n_experts} per block"


def infer_mapping(small: nn.Module, big: nn.Module) -> GrowthMapping:
    """The mapping of a pair, or NotAPair (one line) when the two cannot be a grown pair."""
    problem = pair_problem(small.config, big.config)
    if problem:
        raise NotAPair(problem)
    s = big.config.dim // small.config.dim
    found = residual_map(small.embed.weight.detach().double(), big.embed.weight.detach().double(), s)
    groups = found if found is not None else positional(s, small.config.dim)
    blocks = infer_blocks(small, big, groups)
    m = GrowthMapping(s, small.config, big.config, blocks)
    if s > 1:
        clones = CloneGroups(big, s)
        m.layout_note = clones.layout() if found is not None else (
            "the embedding's columns are no copies of SMALL's: positional tiling assumed")
    m.expert_note = _expert_note(small, big, blocks)
    return m

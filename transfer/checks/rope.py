"""RoPE integrity: head_dim, head counts, theta and the cos/sin tables unchanged, and every cloned head attends
exactly like its source head at every off-diagonal position of a long sequence (a short one cannot show a RoPE
break). GROWTH_VERIFICATION.md section 1."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from transfer.checks import stream
from transfer.checks.labels import block_label
from transfer.checks.pair import ModelPair, rejected_pair, relative_drift, require_tokens
from transfer.checks.results import FIX_FUNCTIONAL, FIX_ROPE, CheckResult, norm_fix

NAME = "RoPE integrity"
QUANTITY = "max drift of cloned heads' attention probabilities and of the RoPE tables"  # limit: <= tolerance
QUANTITY_CONFIG = "RoPE config fields changed (head_dim, head counts, theta)"  # limit: 0
QUANTITY_RELABEL = "max relative drift of relabelled heads' outputs and o_proj writes"  # limit: <= tolerance
FIX_RELABEL = ("relabel each head's q, k and v rows and its o_proj columns together (kv heads with their query "
               "groups): one permutation for all four")


@dataclass(frozen=True)
class RopeLimits:
    tolerance: float = 1e-5  # absolute, on attention probabilities (they lie in [0, 1]) and on table entries


@dataclass
class BlockAttention:
    """One original block: how far its cloned heads' attention probabilities drift, and its input."""

    block: int
    label: str
    drift: float  # max |p_new - p_old| at off-diagonal positions, over every copy of every head
    drift_far: float  # the same over queries t >= T // 2 (long range)
    input_drift: float  # relative drift of attention_norm(tile(x)) against tile(attention_norm_old(x))
    relabelling: list[int] | None = None  # new head i copies old head relabelling[i] (found by attention, not position)
    output_drift: float | None = None  # with a relabelling: drift of the heads' outputs and o_proj writes (consistency)


@dataclass
class RopeStats:
    scale_factor: int
    old_heads: tuple[int, int, int]  # (n_heads, kv_heads, head_dim)
    new_heads: tuple[int, int, int]
    old_theta: float
    new_theta: float
    config_changes: list[str] = field(default_factory=list)
    table_drift: float | None = None  # None: the config is wrong, nothing dynamic was measured
    blocks: list[BlockAttention] = field(default_factory=list)
    seq_len: int = 0

    def config_problems(self) -> list[str]:
        (oh, okv, ohd), (nh, nkv, nhd), s = self.old_heads, self.new_heads, self.scale_factor
        problems = []
        if nhd != ohd:
            problems.append(f"head_dim changed from {ohd} to {nhd}, which re-pairs RoPE's rotated dimensions and "
                            f"changes its frequencies (limit: unchanged).")
        kv_ok = nkv == okv * s or nkv == okv == 1  # MQA may keep its single KV head
        if nh != oh * s or not kv_ok:
            problems.append(f"heads went {oh}/{okv} (q/kv) -> {nh}/{nkv} while width grew x{s} "
                            f"(expected {oh * s}/{okv * s}).")
        if self.new_theta != self.old_theta:
            problems.append(f"rope_theta changed from {self.old_theta} to {self.new_theta}.")
        return problems


def measure_rope(pair: ModelPair, resolution: float = 1e-5) -> RopeStats:
    """Config and tables, then (if the config is right) every original block's attention probabilities on the
    old model's real hidden state: old block on x, new block on tile(x), head j + H*c against old head j, or,
    where that drifts beyond `resolution`, each new head against the old head it attends like."""
    oc, nc = pair.oc, pair.nc
    stats = RopeStats(pair.s, (oc.n_heads, oc.kv_heads, oc.head_dim), (nc.n_heads, nc.kv_heads, nc.head_dim),
                      oc.rope_theta, nc.rope_theta, pair.config_changes)
    if stats.config_problems():
        return stats
    n = min(oc.max_seq_len, nc.max_seq_len)
    (new_cos, new_sin), (old_cos, old_sin) = pair.rope("new", n), pair.rope("old", n)
    stats.table_drift = max((new_cos - old_cos).abs().max().item(), (new_sin - old_sin).abs().max().item())
    old_out, _ = pair.outputs()
    T = stats.seq_len = pair.tokens.shape[1]
    off_diag = torch.ones(T, T, dtype=torch.bool, device=pair.tokens.device).tril(-1)  # key < query
    far = off_diag.clone()
    far[: T // 2] = False  # queries in the second half of the sequence: long-range positions
    with torch.no_grad():
        for j, (src, inserted) in enumerate(pair.layout):
            if inserted:  # its input is another block's output: nothing in the old model to compare with
                continue
            stats.blocks.append(_block_attention(pair, j, src, old_out.hidden_states[src], off_diag, far, resolution))
    return stats


def _block_attention(pair: ModelPair, j: int, src: int, x_old: Tensor, off_diag: Tensor, far: Tensor,
                     resolution: float) -> BlockAttention:
    """Cloned heads against their source heads: by position (head j + H*c) first; where that drifts beyond
    `resolution`, by what each head computes (its attention probabilities), so relabelled heads match."""
    ob, nb = pair.block("old", src), pair.block("new", j)
    normed_old = ob.attention_norm(x_old)
    normed_new = nb.attention_norm(pair.tile(x_old))
    p_old = ob.attention.attention_probs(normed_old, *pair.rope("old"))
    p_new = nb.attention.attention_probs(normed_new, *pair.rope("new"))
    B, H, T, _ = p_old.shape
    match = torch.arange(p_new.shape[1], device=p_new.device) % H  # new head i copies old head i % H
    diff = (p_new.view(B, pair.s, H, T, T) - p_old.unsqueeze(1)).abs()  # by position: a view, no gathered copy
    b = BlockAttention(j, block_label(pair.layout, j), diff[..., off_diag].max().item(), diff[..., far].max().item(),
                       relative_drift(normed_new, pair.tile(normed_old)))
    del diff
    if b.drift > resolution:
        best = _best_match(p_new, p_old, off_diag, pair.s)
        if best is not None and not torch.equal(best, match):
            b.drift, b.drift_far = (_head_drifts(p_new, p_old, best, m).max().item() for m in (off_diag, far))
            b.relabelling = best.tolist()
            b.output_drift = _relabelled_output_drift(pair, ob, nb, normed_old, normed_new, p_old, p_new, best)
    return b


def _head_drifts(p_new: Tensor, p_old: Tensor, match: Tensor, mask: Tensor) -> Tensor:
    """(new heads,) max |p_new_i - p_old_match[i]| over the masked (query, key) positions."""
    return (p_new - p_old[:, match]).abs()[..., mask].amax(dim=(0, 2))


def _best_match(p_new: Tensor, p_old: Tensor, mask: Tensor, s: int) -> Tensor | None:
    """The old head each new head attends like (closest probabilities), if every old head gets exactly s copies."""
    H = p_old.shape[1]
    d = torch.stack([(p_new - p_old[:, m:m + 1]).abs()[..., mask].amax(dim=(0, 2)) for m in range(H)], dim=1)
    best = d.argmin(dim=1)  # (new heads,)
    return best if torch.equal(torch.bincount(best, minlength=H), torch.full((H,), s, device=best.device)) else None


def _relabelled_output_drift(pair: ModelPair, ob, nb, normed_old: Tensor, normed_new: Tensor, p_old: Tensor,
                             p_new: Tensor, match: Tensor) -> float:
    """A relabelling is consistent when each relabelled head also reads its source head's values and its copies'
    o_proj columns write what the source head wrote (tiled): the largest relative drift of either."""
    hd = pair.oc.head_dim
    _, _, v_old = ob.attention.qkv(normed_old, *pair.rope("old"))
    _, _, v_new = nb.attention.qkv(normed_new, *pair.rope("new"))
    y_old, y_new = p_old @ v_old, p_new @ v_new  # (B, heads, T, hd)
    worst = relative_drift(y_new, y_old[:, match])
    w_old, w_new = ob.attention.o_proj.weight, nb.attention.o_proj.weight
    for m in range(p_old.shape[1]):
        copies = (match == m).nonzero().flatten().tolist()
        wrote = sum(y_new[:, i] @ w_new[:, i * hd:(i + 1) * hd].t() for i in copies)  # (B, T, D_new)
        worst = max(worst, relative_drift(wrote, pair.tile(y_old[:, m] @ w_old[:, m * hd:(m + 1) * hd].t())))
    return worst


def judge_rope(stats: RopeStats, limits: RopeLimits = RopeLimits()) -> CheckResult:
    """Config, tables, then attention drift; a drift whose block input already drifts is that drift's consequence."""
    tol = limits.tolerance
    metrics = {"old_head_dim": stats.old_heads[2], "new_head_dim": stats.new_heads[2], "old_n_heads": stats.old_heads[0],
               "new_n_heads": stats.new_heads[0], "scale_factor": stats.scale_factor}
    problems = stats.config_problems()
    if problems:
        return CheckResult(NAME, False, " ".join(problems) + f" Fix: {FIX_ROPE}.", metrics, FIX_ROPE,
                           quantity=QUANTITY_CONFIG, value=len(problems), limit=0)
    worst = max(stats.blocks, key=lambda b: b.drift, default=None)
    worst_far = max((b.drift_far for b in stats.blocks), default=0.0)
    headline = dict(quantity=QUANTITY, value=max(stats.table_drift, worst.drift if worst else 0.0), limit=tol)
    metrics.update(rope_table_drift=stats.table_drift, max_attention_prob_drift=worst.drift if worst else 0.0,
                   max_attention_prob_drift_far=worst_far, seq_len=stats.seq_len,
                   max_input_drift=max((b.input_drift for b in stats.blocks), default=0.0),
                   head_relabelling={b.label: b.relabelling for b in stats.blocks if b.relabelling})
    if stats.table_drift > tol:
        msg = f"RoPE cos/sin tables differ by {stats.table_drift:.2e} (limit {tol:.0e})."
        return CheckResult(NAME, False, f"{msg} Fix: {FIX_ROPE}.", metrics, FIX_ROPE, **headline)
    failing = [b for b in stats.blocks if b.drift > tol]
    inconsistent = [b for b in stats.blocks if b.drift <= tol and b.output_drift is not None and b.output_drift > tol]
    if not failing and inconsistent:
        b = inconsistent[0]
        msg = (f"cloned heads in {b.label} attend like old heads {b.relabelling} (relabelled), but their values and "
               f"o_proj columns were not relabelled with them: head outputs and writes drift by {b.output_drift:.2e} "
               f"relative (limit {tol:.0e}).")
        return CheckResult(NAME, False, f"{msg} Fix: {FIX_RELABEL}.", metrics, FIX_RELABEL, quantity=QUANTITY_RELABEL,
                           value=b.output_drift, limit=tol)
    if not failing:
        drift = worst.drift if worst else 0.0
        return CheckResult(NAME, True, f"head_dim {stats.new_heads[2]} kept, heads {stats.old_heads[0]}->"
                           f"{stats.new_heads[0]}, theta {stats.new_theta:g}; attention probabilities of cloned heads "
                           f"match over {stats.seq_len} positions within {drift:.1e} (limit {tol:.0e})"
                           f"{_relabel_note(stats.blocks)}", metrics, **headline)
    own = [b for b in failing if b.input_drift <= tol]
    if not own:  # every drifting block already gets a drifting input: the norm, not RoPE
        return _consequence(failing[0], stats.config_changes, tol, metrics, headline)
    b = max(own, key=lambda b: b.drift)
    fix = (f"{FIX_ROPE}; the head layout and RoPE settings are right here, so look at that block's q/k "
           f"projections and attention norm ({FIX_FUNCTIONAL})")
    msg = (f"cloned heads attend differently from their source heads: attention probabilities drift by {b.drift:.2e} "
           f"at off-diagonal positions (limit {tol:.0e}), worst in {b.label}; {worst_far:.2e} at query positions "
           f">= {stats.seq_len // 2}.")
    return CheckResult(NAME, False, f"{msg} Fix: {fix}.", metrics, fix, **headline)


def _relabel_note(blocks: list[BlockAttention]) -> str:
    relabelled = [b for b in blocks if b.relabelling]
    if not relabelled:
        return ""
    return (f" (heads relabelled consistently, q/k/v rows and o_proj columns together, in "
            f"{', '.join(f'{b.label} as {b.relabelling}' for b in relabelled[:3])}{' ...' if len(relabelled) > 3 else ''})")


def _consequence(b: BlockAttention, changes: list[str], tol: float, metrics: dict, headline: dict) -> CheckResult:
    fix = norm_fix(changes)
    where = f"{b.label} attention_norm"
    msg = (f"attention probabilities drift by {b.drift:.2e} (limit {tol:.0e}) in {b.label}, but that block's input "
           f"already drifts: its attention_norm output differs by {b.input_drift:.2e} relative (limit {tol:.0e}). "
           f"A consequence of the drift at {where}, not a RoPE fault. Fix: {fix}.")
    return CheckResult(NAME, False, msg, metrics, fix, consequence_of=where, **headline)


@stream.reusing_blocks
def check_rope_integrity(old_model: nn.Module, new_model: nn.Module, tokens: Tensor | None = None,
                         tolerance: float = 1e-5, dtype: torch.dtype = torch.float64) -> CheckResult:
    """head_dim, head counts, theta and RoPE tables unchanged, and each cloned head's attention probabilities
    equal its source head's at every off-diagonal position of a long sequence. tokens=None uses seeded random
    ids of length min(max_seq_len, 128)."""
    if tokens is None:
        T = min(old_model.config.max_seq_len, new_model.config.max_seq_len, 128)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, old_model.config.vocab_size, (2, T), generator=gen)
    require_tokens(tokens, min_len=16, why="RoPE breaks are invisible on short sequences")
    rejected = rejected_pair(NAME, old_model, new_model)
    if rejected:
        return rejected
    return judge_rope(measure_rope(ModelPair(old_model, new_model, tokens, dtype), tolerance), RopeLimits(tolerance))

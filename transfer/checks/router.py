"""Router integrity: the grown routers score the real upstream hidden states as the old ones did (logits, top-k
choice, load per expert; consistently relabelled experts count as the same routing), and the grown model's
routing is healthy (load entropy, dead experts). GROWTH_VERIFICATION.md section 2."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import expert_load, load_entropy
from transfer.checks import stream
from transfer.checks.labels import block_label
from transfer.checks.pair import ModelPair, rejected_pair, relative_drift, require_tokens
from transfer.checks.results import (FIX_COLLAPSE, FIX_INSERTED_COLLAPSE, FIX_RETRAIN_BALANCE, FIX_ROUTER,
                                     CheckResult, norm_fix)

NAME = "Router integrity"
# Headline figures; the limit of each is in the comment, and the one reported is the first criterion that fails.
Q_DRIFT = "max router-logit drift relative to |w_e||x_t|"  # <= tolerance
Q_TOPK = "tokens whose top-k experts changed (near-ties excluded)"  # <= 0
Q_LOAD = "per-expert load difference beyond near-ties, in tokens"  # <= 0
Q_ENTROPY = "lowest per-layer load entropy, as a fraction of ln E"  # >= min_load_entropy
Q_DEAD = "most experts without a token in one layer"  # <= max_dead_fraction * E
RELABEL_TOKENS = 64  # tokens on which expert functions are compared when looking for a relabelling


@dataclass(frozen=True)
class RouterLimits:
    tolerance: float = 1e-5  # router logit drift, relative to |w_e| |x_t|
    min_load_entropy: float = 0.5  # H(load) / ln E of every block
    max_dead_fraction: float = 0.25  # experts without a token, as a fraction of E


@dataclass
class BlockBalance:
    block: int
    label: str
    inserted: bool
    entropy: float  # H(load) / ln E of the grown block on its own forward pass
    dead: int  # experts that got no token
    old_entropy: float | None = None  # the same for the old source block (old model MoE, original block)
    old_dead: int | None = None


@dataclass
class BlockRouting:
    """One original block's router, old against new on the same (tiled) real input."""

    block: int
    label: str
    logit_drift: float  # max |delta logit| / (|w_e| |x_t|)
    topk_disagreements: int  # tokens whose top-k expert set differs, near-ties excluded
    near_ties: int  # tokens whose k-th and (k+1)-th old logits are within the resolution
    load_difference: int  # max over experts of |load_new - load_old|
    input_drift: float  # relative drift of ffn_norm(tile(h)) against tile(ffn_norm_old(h))
    relabelling: list[int] | None = None  # new expert e is old expert relabelling[e] (router and weights both)

    def agrees(self, tolerance: float) -> bool:
        return self.logit_drift <= tolerance and not self.topk_disagreements and self.load_difference <= self.near_ties


@dataclass
class RouterStats:
    is_moe: bool
    old_is_moe: bool
    n_experts: int = 0
    top_k: int = 0
    balance: list[BlockBalance] = field(default_factory=list)
    routing: list[BlockRouting] = field(default_factory=list)
    config_changes: list[str] = field(default_factory=list)


def measure_router(pair: ModelPair, resolution: float = 1e-5) -> RouterStats:
    """Balance of every grown block; for an MoE old model, each original block's routing against the old one.
    `resolution` is how close two logits must be to count as a near-tie, and the drift under which a
    permutation of experts counts as the same routing."""
    oc, nc = pair.oc, pair.nc
    stats = RouterStats(nc.is_moe, oc.is_moe, nc.n_experts, nc.top_k, config_changes=pair.config_changes)
    if not nc.is_moe:
        return stats
    old_out, new_out = pair.outputs()
    for j, logits in enumerate(new_out.router_logits):
        src, inserted = pair.layout[j]
        counts = expert_load(logits, nc.top_k)
        b = BlockBalance(j, block_label(pair.layout, j), inserted, load_entropy(counts), int((counts == 0).sum()))
        if oc.is_moe and not inserted:
            old_counts = expert_load(old_out.router_logits[src], oc.top_k)
            b.old_entropy, b.old_dead = load_entropy(old_counts), int((old_counts == 0).sum())
        stats.balance.append(b)
    if oc.is_moe:
        with torch.no_grad():
            stats.routing = [_block_routing(pair, j, src, old_out.hidden_states[src], resolution)
                             for j, (src, inserted) in enumerate(pair.layout) if not inserted]
    return stats


def _block_routing(pair: ModelPair, j: int, src: int, x: Tensor, resolution: float) -> BlockRouting:
    """Old router on the old block's FFN input h; new router on the new ffn_norm of tile(h)."""
    ob, nb = pair.block("old", src), pair.block("new", j)
    h_old = ob.attention_residual(x, *pair.rope("old"))
    x_old = ob.ffn_norm(h_old).flatten(0, 1)  # (N, D)
    x_new = nb.ffn_norm(pair.tile(h_old)).flatten(0, 1)
    old_logits, new_logits = ob.ffn.router(x_old), nb.ffn.router(x_new)
    # Each logit is a dot product w_e . x_t: its error is judged against |w_e| |x_t|, the scale its rounding
    # lives on. Against the logits' own RMS it would be inflated wherever w_e is nearly orthogonal to x_t
    # (a router centred on the mean hidden state gives logits ~1e-3 of that scale).
    scale = torch.outer(x_old.norm(dim=-1), ob.ffn.router.weight.norm(dim=-1)).clamp(min=1e-300)
    label, input_drift = block_label(pair.layout, j), relative_drift(x_new, pair.tile(x_old))
    routing = _agreement(old_logits, new_logits, scale, pair.oc.top_k, resolution, j, label, input_drift)
    if not routing.agrees(resolution):
        perm = _relabelling(ob, nb, x_old, x_new, old_logits, new_logits, scale, pair.tile, resolution)
        if perm is not None:
            aligned = new_logits[:, torch.tensor(perm).argsort()]  # column e = the new expert that is old e
            routing = _agreement(old_logits, aligned, scale, pair.oc.top_k, resolution, j, label, input_drift)
            routing.relabelling = perm
    return routing


def _agreement(old_logits: Tensor, new_logits: Tensor, scale: Tensor, k: int, resolution: float, j: int,
               label: str, input_drift: float) -> BlockRouting:
    drift = ((new_logits - old_logits).abs() / scale).max().item()
    top = old_logits.topk(min(k + 1, old_logits.shape[-1]), dim=-1).values
    rms = old_logits.pow(2).mean().sqrt()
    if top.shape[1] > k:
        tie = (top[:, k - 1] - top[:, k]).abs() <= resolution * rms
    else:
        tie = torch.zeros_like(top[:, 0], dtype=torch.bool)
    same = (old_logits.topk(k).indices.sort().values == new_logits.topk(k).indices.sort().values).all(-1)
    load = int((expert_load(new_logits, k) - expert_load(old_logits, k)).abs().max())
    return BlockRouting(j, label, drift, int((~same & ~tie).sum()), int(tie.sum()), load, input_drift)


def _relabelling(ob, nb, x_old: Tensor, x_new: Tensor, old_logits: Tensor, new_logits: Tensor, scale: Tensor,
                 tile, resolution: float) -> list[int] | None:
    """A permutation perm (new expert e is old expert perm[e]) under which both the router columns and the expert
    functions match, i.e. experts relabelled consistently; None if there is none other than the identity."""
    E = old_logits.shape[1]
    column_drift = ((new_logits[:, :, None] - old_logits[:, None, :]).abs() / scale[:, None, :]).amax(0)  # (E, E)
    perm = column_drift.argmin(dim=1)
    if sorted(perm.tolist()) != list(range(E)) or perm.tolist() == list(range(E)):
        return None
    if column_drift[torch.arange(E), perm].max() > resolution:
        return None
    y_old, y_new = _experts(ob.ffn, x_old[:RELABEL_TOKENS]), _experts(nb.ffn, x_new[:RELABEL_TOKENS])  # (E, n, D)
    tiled = tile(y_old)
    if max(relative_drift(y_new[e], tiled[perm[e]]) for e in range(E)) > resolution:
        return None
    return perm.tolist()


def _experts(ffn: nn.Module, x: Tensor) -> Tensor:
    """Every expert's SwiGLU output on every token: (E, N, D)."""
    h = F.silu(torch.einsum("nd,efd->enf", x, ffn.gate_proj)) * torch.einsum("nd,efd->enf", x, ffn.up_proj)
    return torch.einsum("enf,edf->end", h, ffn.down_proj)


def judge_router(stats: RouterStats, limits: RouterLimits = RouterLimits()) -> CheckResult:
    """Collapse (with its cause: inherited, inserted block, or growth) and routing agreement; a disagreement
    whose router input already drifts is reported as that drift's consequence."""
    if not stats.is_moe:
        return CheckResult(NAME, True, "new model is dense: no router to check", quantity="routers: none (dense)")
    tol, E = limits.tolerance, stats.n_experts
    entropies, dead = [b.entropy for b in stats.balance], [b.dead for b in stats.balance]
    metrics = {"min_load_entropy": min(entropies), "max_dead_experts": max(dead), "n_experts": E}
    problems, fix, cause = [], "", None
    collapsed = [b for b in stats.balance if _collapsed(b.entropy, b.dead, E, limits)]
    if collapsed:
        fix = _collapse(collapsed, stats.old_is_moe, E, limits, problems)
    compared = "old model is dense: routing checked for balance only"
    if stats.routing:
        r = stats.routing
        drift = max(b.logit_drift for b in r)
        metrics.update(router_logit_drift=drift, topk_disagreements=sum(b.topk_disagreements for b in r),
                       near_ties_excluded=sum(b.near_ties for b in r), max_load_difference=max(b.load_difference for b in r),
                       max_input_drift=max(b.input_drift for b in r),
                       expert_relabelling={b.label: b.relabelling for b in r if b.relabelling})
        failing = [b for b in r if not b.agrees(tol)]
        own = [b for b in failing if b.input_drift <= tol]
        if own:
            worst = max(r, key=lambda b: b.logit_drift)
            problems.append(f"router logits drifted by {drift:.2e} relative to |w_e||x_t| (limit {tol:.0e}), worst in "
                            f"{worst.label}; top-k agreement misses {metrics['topk_disagreements']} token(s) (limit 0); "
                            f"per-expert load differs by up to {metrics['max_load_difference']} token(s).")
            fix = FIX_ROUTER
        elif failing:
            b = failing[0]
            cause, fix = f"{b.label} ffn_norm", norm_fix(stats.config_changes)
            problems.append(f"router logits drift by {b.logit_drift:.2e} (limit {tol:.0e}) in {b.label}, but the router's "
                            f"input already drifts there: that block's ffn_norm output differs by {b.input_drift:.2e} "
                            f"relative (limit {tol:.0e}). A consequence of the drift at {cause}, not a router fault.")
        compared = (f"logits match within {drift:.1e} (limit {tol:.0e}), 100% top-{stats.top_k} agreement, "
                    f"identical per-expert load" + _relabel_note(r))
    headline = _headline(stats, limits)
    if problems:
        return CheckResult(NAME, False, " ".join(problems) + f" Fix: {fix}.", metrics, fix, cause, **headline)
    ok = f"{compared}; balance: load entropy >= {min(entropies):.2f} of ln(E), {max(dead)} dead expert(s) of {E}"
    return CheckResult(NAME, True, ok, metrics, **headline)


def _headline(stats: RouterStats, limits: RouterLimits) -> dict:
    """The first failing criterion in the order the verdict reports them (collapse, then agreement), else the
    main one: logit drift when routing was compared, load entropy when the old model was dense."""
    entropy = min(b.entropy for b in stats.balance)
    balance = dict(quantity=Q_ENTROPY, value=entropy, limit=limits.min_load_entropy, higher_is_better=True)
    if entropy < limits.min_load_entropy:
        return balance
    dead = max(b.dead for b in stats.balance)
    if dead > limits.max_dead_fraction * stats.n_experts:
        return dict(quantity=Q_DEAD, value=dead, limit=limits.max_dead_fraction * stats.n_experts)
    if not stats.routing:
        return balance
    r, tol = stats.routing, limits.tolerance
    drift = dict(quantity=Q_DRIFT, value=max(b.logit_drift for b in r), limit=tol)
    if drift["value"] > tol or all(b.agrees(tol) for b in r):
        return drift
    if any(b.topk_disagreements for b in r):
        return dict(quantity=Q_TOPK, value=sum(b.topk_disagreements for b in r), limit=0)
    return dict(quantity=Q_LOAD, value=max(b.load_difference - b.near_ties for b in r), limit=0)


def _collapsed(entropy: float, dead: int, E: int, limits: RouterLimits) -> bool:
    return entropy < limits.min_load_entropy or dead > limits.max_dead_fraction * E


def _collapse(collapsed: list[BlockBalance], old_is_moe: bool, E: int, limits: RouterLimits, problems: list[str]) -> str:
    """Describe the first collapsed block and return the fix for where the collapse comes from."""
    b = collapsed[0]
    problems.append(f"routing has collapsed in {len(collapsed)} layer(s), first block {b.block}: load entropy "
                    f"{b.entropy:.2f} of ln(E) (limit >= {limits.min_load_entropy}), {b.dead} of {E} experts get no "
                    f"token (limit {int(limits.max_dead_fraction * E)}).")
    if not old_is_moe:
        return FIX_COLLAPSE
    if b.inserted:
        problems.append("That block is an inserted identity block: its router copies its neighbour's but reads the "
                        "neighbour's output.")
        return FIX_INSERTED_COLLAPSE
    if _collapsed(b.old_entropy, b.old_dead, E, limits):
        problems.append(f"The old model's source block was already this unbalanced (load entropy {b.old_entropy:.2f}, "
                        f"{b.old_dead} dead): growth kept it; training the MoE phase let it collapse.")
        return FIX_RETRAIN_BALANCE
    return FIX_ROUTER


def _relabel_note(routing: list[BlockRouting]) -> str:
    relabelled = [b for b in routing if b.relabelling]
    if not relabelled:
        return ""
    return (f" (experts relabelled consistently, router rows and expert weights permuted together, in "
            f"{', '.join(f'{b.label} as {b.relabelling}' for b in relabelled)}: the same function and routing up to "
            f"names)")


@stream.reusing_blocks
def check_router_integrity(old_model: nn.Module, new_model: nn.Module, tokens: Tensor, tolerance: float = 1e-5,
                           min_load_entropy: float = 0.5, max_dead_fraction: float = 0.25,
                           dtype: torch.dtype = torch.float64) -> CheckResult:
    """Router logits on the real upstream hidden states unchanged by growth, 100% top-k agreement (near-ties
    excluded), same per-expert load; and the grown model's routing healthy (load entropy, dead experts)."""
    require_tokens(tokens)
    rejected = rejected_pair(NAME, old_model, new_model)
    if rejected:
        return rejected
    stats = measure_router(ModelPair(old_model, new_model, tokens, dtype), tolerance)
    return judge_router(stats, RouterLimits(tolerance, min_load_entropy, max_dead_fraction))

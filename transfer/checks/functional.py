"""Functional equivalence: layer by layer, the grown model's hidden states are the old ones tiled and its logits
are the old logits; a drifting block is then located to its first drifting stage (attention_norm, attention,
ffn_norm, ffn), each fed its exact tiled input, so the fix names what to change. GROWTH_VERIFICATION.md section 4."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from transfer.checks import stream
from transfer.checks.labels import STAGES, block_label
from transfer.checks.pair import ModelPair, rejected_pair, relative_drift, require_tokens
from transfer.checks.results import FIX_FUNCTIONAL, CheckResult, norm_fix

NAME = "Functional equivalence"
QUANTITY = "max relative drift of hidden states and logits from the old model's"  # limit: <= tolerance

# What to look at, by the first drifting place (the section-4 table of GROWTH_VERIFICATION.md, one line each).
STAGE_FIX = {
    "embedding": "the embedding must tile without division (E.repeat(1, s)); untie a tied LM head when s > 1",
    "attention": "that block's q/k/v/o weights: W.repeat(s, s) / s, tiled (not interleaved), noise zero-sum over the "
                 "input copies; an inserted block's o_proj must be zero",
    "ffn": "that block's gate/up/down weights (every expert's): W.repeat(s, s) / s, tiled, noise zero-sum over the "
           "input copies, experts in the router's order; an inserted block's down_proj must be zero",
    "logits": "the LM head must widen its input only, divided by s (W.repeat(1, s) / s), and the final norm tile",
}


@dataclass(frozen=True)
class FunctionalLimits:
    tolerance: float = 1e-5  # relative drift max |new - ref| / RMS(ref)


@dataclass
class FunctionalStats:
    drifts: dict[str, float]  # "embedding", "block j", ..., "logits", in forward order
    labels: list[str]  # the same places, as users read them
    n_blocks: int
    stages: dict[str, float] | None = None  # local drift of each stage of the first drifting block (if any)
    config_changes: list[str] = field(default_factory=list)


def measure_functional(pair: ModelPair, locate_above: float = 1e-5) -> FunctionalStats:
    """Drift of every layer's output against the old one tiled; the first block drifting more than
    locate_above is taken apart stage by stage."""
    old_out, new_out = pair.outputs()
    # Every row of the table, including token ids the batch does not contain.
    drifts = {"embedding": max(pair.embedding_drift(),
                               relative_drift(new_out.hidden_states[0], pair.tile(old_out.hidden_states[0])))}
    for j, (src, _) in enumerate(pair.layout):
        drifts[f"block {j}"] = relative_drift(new_out.hidden_states[j + 1], pair.tile(old_out.hidden_states[src + 1]))
    drifts["logits"] = relative_drift(new_out.logits, old_out.logits)
    labels = ["embedding"] + [block_label(pair.layout, j) for j in range(len(pair.layout))] + ["logits"]
    stats = FunctionalStats(drifts, labels, len(pair.layout), config_changes=pair.config_changes)
    first = next((i for i, d in enumerate(drifts.values()) if d > locate_above), None)
    if first is not None and 0 < first <= len(pair.layout):
        with torch.no_grad():
            stats.stages = _stage_drifts(pair, first - 1, old_out.hidden_states)
    return stats


def _stage_drifts(pair: ModelPair, j: int, old_hidden: list[Tensor]) -> dict[str, float]:
    """Each stage of new block j on the exact tiled input of that stage, against the old block's (an inserted
    block against the identity: its attention and FFN must add nothing; its norms have nothing to match)."""
    src, inserted = pair.layout[j]
    nb, (cos, sin) = pair.block("new", j), pair.rope("new")
    if inserted:
        x = pair.tile(old_hidden[src + 1])
        h = x + nb.attention(nb.attention_norm(x), cos, sin)
        return {"attention": relative_drift(h, x), "ffn": relative_drift(h + nb.ffn(nb.ffn_norm(h))[0], h)}
    ob, x = pair.block("old", src), old_hidden[src]
    a_in = ob.attention_norm(x)
    h = x + ob.attention(a_in, *pair.rope("old"))
    f_in = ob.ffn_norm(h)
    y = h + ob.ffn(f_in)[0]
    t = pair.tile
    return {"attention_norm": relative_drift(nb.attention_norm(t(x)), t(a_in)),
            "attention": relative_drift(t(x) + nb.attention(t(a_in), cos, sin), t(h)),
            "ffn_norm": relative_drift(nb.ffn_norm(t(h)), t(f_in)),
            "ffn": relative_drift(t(h) + nb.ffn(t(f_in))[0], t(y))}


def judge_functional(stats: FunctionalStats, limits: FunctionalLimits = FunctionalLimits()) -> CheckResult:
    """Fails at the first layer beyond tolerance (every earlier one within it), with the fix for that place."""
    tol = limits.tolerance
    values = list(stats.drifts.values())
    first = next((i for i, d in enumerate(values) if d > tol), None)
    metrics = {"layer_drift": stats.drifts, "max_drift": max(values), "logits_drift": stats.drifts["logits"],
               "first_bad_layer": None if first is None else stats.labels[first],
               "first_bad_stage": None, "stage_drift": stats.stages}
    headline = dict(quantity=QUANTITY, value=metrics["max_drift"], limit=tol)
    if first is None:
        return CheckResult(NAME, True, f"{stats.n_blocks} blocks and logits match the old model: max relative drift "
                           f"{metrics['max_drift']:.1e} (limit {tol:.0e}), logits {stats.drifts['logits']:.1e}", metrics,
                           **headline)
    where, why = stats.labels[first], ""
    if first == 0:
        fix = f"{STAGE_FIX['embedding']}; {FIX_FUNCTIONAL}"
    elif first == len(values) - 1:
        fix = f"{STAGE_FIX['logits']}; {FIX_FUNCTIONAL}"
    else:
        stage = next((k for k in STAGES if stats.stages and stats.stages.get(k, 0.0) > tol), None)
        metrics["first_bad_stage"] = stage
        if stage is None:  # no single stage beyond the limit: small drifts that add up
            fix = FIX_FUNCTIONAL
            why = " No stage of that block drifts beyond the limit on its own exact input: small drifts add up."
        else:
            fix = f"{norm_fix(stats.config_changes) if stage.endswith('norm') else STAGE_FIX[stage]}; {FIX_FUNCTIONAL}"
            why = (f" Within it, the {stage} stage drifts first, by {stats.stages[stage]:.2e} on its exact tiled "
                   f"input.")
    changes = f" Config fields growth must keep changed: {', '.join(stats.config_changes)}." if stats.config_changes else ""
    msg = (f"the grown model's hidden state first departs from the old one's at {where}: relative drift "
           f"{values[first]:.2e} (limit {tol:.0e}; every layer before it is within the limit); logits drift "
           f"{stats.drifts['logits']:.2e}.{why}{changes} Fix: {fix}.")
    return CheckResult(NAME, False, msg, metrics, fix, **headline)


@stream.reusing_blocks
def check_functional_equivalence(old_model: nn.Module, new_model: nn.Module, tokens: Tensor,
                                 tolerance: float = 1e-5, dtype: torch.dtype = torch.float64) -> CheckResult:
    """Layer by layer, the grown model's hidden states must be the old ones tiled, and its logits equal;
    relative drift is max |delta| / RMS(old). Names the first layer beyond tolerance and, within a block, its
    first drifting stage. Works for dense -> MoE (same width) and for bilateral growth (inserted identity
    blocks compare with their source's output)."""
    require_tokens(tokens, min_len=1)
    rejected = rejected_pair(NAME, old_model, new_model)
    if rejected:
        return rejected
    stats = measure_functional(ModelPair(old_model, new_model, tokens, dtype), tolerance)
    return judge_functional(stats, FunctionalLimits(tolerance))

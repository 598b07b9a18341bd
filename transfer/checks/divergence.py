"""Clone divergence through phase 3: how far the units that width growth cloned have moved apart, and a rule that
warns when they stop diverging or re-lock. Both pure: the training loop measures at each eval and logs the
record; the judge reads the list of records.

    record = measure_clone_divergence(raw_model, scale_factor=2)   # {"attention_heads": .., "ffn_neurons": ..,
                                                                   #  "residual": .., "min": .., "*_raw": ..}
    verdict = judge_clone_divergence(history_of_records)           # CheckResult; passed=False is a warning

Distance of one pair of copies (a, b) of one unit: ||w_a - w_b|| / mean(||w_a||, ||w_b||), scale-free; a kind's
figure is the median over every unit and every pair of copies. Which units are copies is found by what they
compute (transfer.checks.clones: the project's copy c of unit u is unit u + n*c, other tools interleave or
relabel). Units whose copies are both zero (an inserted block's o_proj at growth) are skipped.

What is compared is what the copies compute: a row's weights summed over its s input copies, i.e. the weight
it applies to a tiled input [x; x; ...]. The symmetry-breaking noise sums to zero there, so every kind starts
at ~1e-8 (the fp32 rounding of the stored weights) and grows only as training makes the copies compute
different things; with noise_std 0 every kind is exactly 0 and stays 0. The raw row distance (noise included)
is reported too, as *_raw: it starts at ~0.42 for noise_std 0.3 and falls as training grows the rows'
common part and weight decay shrinks the noise (0.43 -> 0.36 in 40 steps on a tiny model while the
functional figure rose from 2e-8 to 0.015), so it cannot tell re-locking from ordinary training.

  attention_heads      q, k, v rows of each head (k, v skipped when MQA kept its single KV head), every block
  ffn_neurons          gate and up rows of each neuron (of each expert), every block
  residual             residual-stream copies: embedding columns, untied LM head columns, router columns, the
                       RMSNorm weights (all norms of a residual dimension form one vector), and the o_proj and
                       down_proj rows that write each residual copy
  attention_heads_raw  q, k, v rows and o_proj columns of each head, unsummed
  ffn_neurons_raw      gate, up rows and down_proj columns of each neuron, unsummed
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from transfer.checks.clones import CloneGroups, by_groups
from transfer.checks.results import FIX_SYMMETRY, CheckResult

KINDS = ("attention_heads", "ffn_neurons", "residual")
RAW_KINDS = ("attention_heads_raw", "ffn_neurons_raw")
NAME = "Clone divergence"
Q_LATEST = "lowest latest clone divergence over kinds"  # >= floor, once min_evals records are in
Q_RELOCK = "lowest latest / running-maximum clone divergence of a re-locking kind"  # >= relock_fraction
FIX_STALLED = f"the clones never started to move apart: {FIX_SYMMETRY}"
FIX_RELOCK = ("the clones are converging again: lower phase 3's weight decay or learning rate (they shrink the "
              "differences the noise started faster than training grows them), or raise noise_std at growth")


@dataclass(frozen=True)
class DivergenceLimits:
    """Limits of the clone-divergence rule, calibrated on real runs (GROWTH_VERIFICATION.md section 6): correct
    growth read 5e-4 after 10 micro steps and 9e-3 after 50 cpu-preset steps, rising to 0.03 and never falling;
    pure clones read exactly 0."""

    floor: float = 1e-4  # a kind whose latest figure is below this after min_evals records has not diverged
    min_evals: int = 3  # records before the floor rule applies (phase 3's evals, the first eval_interval after growth)
    relock_fraction: float = 0.5  # latest below this fraction of the kind's running maximum: re-locking


def _raw(model: nn.Module) -> nn.Module:
    """The Transformer under DDP (.module) and/or torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _pair_distances(w: Tensor) -> Tensor:
    """For w (s, units, ...): the relative distance of every unit's every pair of copies a < b, zero units skipped."""
    w = w.flatten(2)
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    norms = torch.linalg.vector_norm(w, dim=-1)  # (s, units)
    out = []
    for a in range(w.shape[0]):
        for b in range(a + 1, w.shape[0]):
            mean = (norms[a] + norms[b]) / 2
            dist = torch.linalg.vector_norm(w[a] - w[b], dim=-1)
            out.append(dist[mean > 0] / mean[mean > 0])
    return torch.cat(out)


def _fold_units(w: Tensor, groups: Tensor) -> Tensor:
    """w (..., N * r) whose last dimension holds N input units of r entries (heads, neurons, residual dims), summed
    over the s copies of each: (..., n * r), the weight applied to an input that is tiled in this grouping."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))  # a bf16 sum would round away small differences
    x = w.reshape(*w.shape[:-1], groups.numel(), -1)[..., groups, :].sum(-3)
    return x.flatten(-2)


def _expert_units(w: Tensor, groups: list[Tensor]) -> Tensor:
    """(E, s*F, ...) -> (s, E*F, ...): row i of expert e and its copies (each expert's own grouping)."""
    return torch.cat([by_groups(w[e], groups[e]) for e in range(len(w))], dim=1)


def _families(model: nn.Module, s: int) -> dict[str, list[Tensor]]:
    """Per kind, tensors (s, units, ...) whose copies are compared; *_raw kinds keep the function-invisible noise.
    The copies are found by what they compute (clones.CloneGroups): tiled, interleaved or relabelled alike."""
    cfg, g = model.config, CloneGroups(model, s)
    res = g.residual
    fam: dict[str, list[Tensor]] = {k: [] for k in KINDS + RAW_KINDS}
    for j, b in enumerate(model.blocks):
        a, f = b.attention, b.ffn
        if g.heads[j] is None or g.neurons[j] is None or (cfg.is_moe and None in g.neurons[j]):
            continue  # heads or neurons not multiplied by s: nothing was cloned there
        qkv = [(a.q_proj.weight, g.heads[j])] + ([(a.k_proj.weight, g.kv_heads[j]), (a.v_proj.weight, g.kv_heads[j])]
                                                 if g.kv_heads[j] is not None else [])
        fam["attention_heads"] += [by_groups(_fold_units(w, res), h) for w, h in qkv]
        fam["attention_heads_raw"] += [by_groups(w, h) for w, h in qkv] + [by_groups(a.o_proj.weight.t(), g.heads[j])]
        fam["residual"].append(by_groups(_fold_units(a.o_proj.weight, g.heads[j]), res))  # what each copy is written
        if cfg.is_moe:
            reads, down, n = [f.gate_proj, f.up_proj], f.down_proj, g.neurons[j]
            fam["ffn_neurons"] += [_expert_units(torch.stack([_fold_units(w[e], res) for e in range(len(w))]), n)
                                   for w in reads]
            fam["ffn_neurons_raw"] += [_expert_units(w, n) for w in reads] + [_expert_units(down.transpose(1, 2), n)]
            folded_down = torch.stack([_fold_units(down[e], n[e]) for e in range(len(down))])  # (E, D, F)
            fam["residual"] += [_expert_units(folded_down, [res] * len(down)), by_groups(f.router.weight.t(), res)]
        else:
            reads, down, n = [f.gate_proj.weight, f.up_proj.weight], f.down_proj.weight, g.neurons[j]
            fam["ffn_neurons"] += [by_groups(_fold_units(w, res), n) for w in reads]
            fam["ffn_neurons_raw"] += [by_groups(w, n) for w in reads] + [by_groups(down.t(), n)]
            fam["residual"].append(by_groups(_fold_units(down, n), res))
    fam["residual"].append(by_groups(model.embed.weight.t(), res))
    if model.lm_head.weight is not model.embed.weight:
        fam["residual"].append(by_groups(model.lm_head.weight.t(), res))
    norms = [b.attention_norm.weight for b in model.blocks] + [b.ffn_norm.weight for b in model.blocks] + [model.norm.weight]
    fam["residual"].append(by_groups(torch.stack(norms, dim=1), res))  # (D, n_norms): one vector per residual dim
    return fam


@torch.no_grad()
def measure_clone_divergence(model: nn.Module, scale_factor: int) -> dict[str, float]:
    """Median relative distance between cloned units, per kind, "min" over the three functional kinds, and the
    raw figures; {} when scale_factor < 2 (nothing was cloned). Reads the live model in place (any dtype,
    DDP/compile wrappers allowed), no copy, no gradient."""
    if scale_factor < 2:
        return {}
    raw = _raw(model)
    record = {}
    for kind, tensors in _families(raw, scale_factor).items():
        d = torch.cat([_pair_distances(w) for w in tensors])
        record[kind] = d.median().item() if len(d) else 0.0
    record["min"] = min(record[k] for k in KINDS)
    return record


def judge_clone_divergence(history: list[dict[str, float]], limits: DivergenceLimits = DivergenceLimits()) -> CheckResult:
    """Warn (passed=False) when a kind has not left the floor after min_evals records, or has fallen below
    relock_fraction of its running maximum. history: measure_clone_divergence records in eval order, extra
    keys (step, phase, ...) ignored; the verdict's metrics hold each kind's latest figure and maximum."""
    kinds = [k for k in KINDS if history and k in history[-1]]
    if not kinds:
        return CheckResult(NAME, True, "no clone-divergence records with cloned units to judge", {"evals": len(history)},
                           quantity="clone-divergence records: none")
    metrics: dict = {"evals": len(history), "latest": {}, "peak": {}, "limits": limits.__dict__.copy()}
    stalled, relocking, ratios, judged = [], [], [], []  # judged: latest figures the floor rule applies to
    for k in kinds:
        values = [h[k] for h in history if k in h]
        latest, peak = values[-1], max(values)
        metrics["latest"][k], metrics["peak"][k] = latest, peak
        if len(values) >= limits.min_evals:
            judged.append(latest)
        if len(values) >= limits.min_evals and latest < limits.floor:
            stalled.append(f"{k} {latest:.2e} after {len(values)} evals (floor {limits.floor:.0e})")
        elif peak >= limits.floor and latest < limits.relock_fraction * peak:
            relocking.append(f"{k} fell to {latest:.3g} from its maximum {peak:.3g} (limit {limits.relock_fraction:g} "
                             f"x maximum)")
            ratios.append(latest / peak)
    # Before min_evals records the floor does not apply yet: the figure is shown without a limit.
    lowest = min(judged or metrics["latest"].values())
    latest = dict(quantity=Q_LATEST, value=lowest, limit=limits.floor if judged else None, higher_is_better=True)
    if stalled:
        msg = f"cloned units have not diverged: {'; '.join(stalled)}."
        return CheckResult(NAME, False, f"{msg} Fix: {FIX_STALLED}.", metrics, FIX_STALLED, **latest)
    if relocking:
        msg = f"cloned units are re-locking: {'; '.join(relocking)}."
        return CheckResult(NAME, False, f"{msg} Fix: {FIX_RELOCK}.", metrics, FIX_RELOCK, quantity=Q_RELOCK,
                           value=min(ratios), limit=limits.relock_fraction, higher_is_better=True)
    figures = ", ".join(f"{k} {metrics['latest'][k]:.3g} (max {metrics['peak'][k]:.3g})" for k in kinds)
    return CheckResult(NAME, True, f"clones keep diverging after {len(history)} evals: {figures}", metrics, **latest)

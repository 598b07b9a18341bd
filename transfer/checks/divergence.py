"""Clone divergence through phase 3: how far the units that width growth cloned have moved apart, and a rule that
warns when they stop diverging or re-lock. Both pure: the training loop measures at each eval and logs the
record; the judge reads the list of records.

    record = measure_clone_divergence(raw_model, scale_factor=2)   # {"attention_heads": .., "ffn_neurons": ..,
                                                                   #  "residual": .., "min": ..}
    verdict = judge_clone_divergence(history_of_records)           # CheckResult; passed=False is a warning

Distance of one pair of copies (a, b) of one unit: ||w_a - w_b|| / mean(||w_a||, ||w_b||), scale-free; a kind's
figure is the median over every unit and every pair of copies (copy c of unit u is unit u + n*c, n the old
count). Units whose copies are both zero (an inserted block's o_proj at growth) are skipped.

  attention_heads  rows of q_proj, k_proj, v_proj (per head; k/v skipped when MQA kept its single KV head) and
                   columns of o_proj (per head), every block
  ffn_neurons      rows of gate_proj and up_proj, columns of down_proj, per neuron (and per expert), every block
  residual         the places where residual-stream copies are exact copies at growth: embedding columns,
                   untied LM head columns, router columns, and the RMSNorm weights (all norms of a residual
                   dimension form one vector)

Right after scale_bilaterally the residual copies are exact (0) and heads and neurons differ only by the
symmetry-breaking noise (about 0.42 at noise_std 0.3); with noise_std 0 every kind is 0 and stays 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from transfer.checks.results import FIX_SYMMETRY, CheckResult

KINDS = ("attention_heads", "ffn_neurons", "residual")
NAME = "Clone divergence"
FIX_STALLED = f"the clones never started to move apart: {FIX_SYMMETRY}"
FIX_RELOCK = ("the clones are converging again: lower phase 3's weight decay or learning rate (they shrink the "
              "differences the noise started faster than training grows them), or raise noise_std at growth")


@dataclass(frozen=True)
class DivergenceLimits:
    """Limits of the clone-divergence rule (defaults uncalibrated: GROWTH_VERIFICATION.md section 6)."""

    floor: float = 1e-3  # a kind whose latest figure is below this after min_evals records has not diverged
    min_evals: int = 3  # records before the floor rule applies (growth itself is typically the first record)
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
    w = w.flatten(2).float()
    a, b = torch.triu_indices(w.shape[0], w.shape[0], offset=1, device=w.device)
    norms = w.norm(dim=-1)
    mean = (norms[a] + norms[b]) / 2
    dist = (w[a] - w[b]).norm(dim=-1)
    return (dist[mean > 0] / mean[mean > 0]).flatten()


def _by_copy(w: Tensor, s: int) -> Tensor:
    """(s*n, ...) -> (s, n, ...): row u + n*c is copy c of unit u."""
    return w.reshape(s, w.shape[0] // s, *w.shape[1:])


def _expert_rows(w: Tensor, s: int) -> Tensor:
    """(E, s*F, D) -> (s, E*F, D): neuron i of expert e and its copies."""
    E, F_, D = w.shape
    return w.reshape(E, s, F_ // s, D).transpose(0, 1).reshape(s, E * (F_ // s), D)


def _families(model: nn.Module, s: int) -> dict[str, list[Tensor]]:
    cfg = model.config
    fam: dict[str, list[Tensor]] = {k: [] for k in KINDS}
    for b in model.blocks:
        a = b.attention
        fam["attention_heads"] += [_by_copy(a.q_proj.weight, s), _by_copy(a.o_proj.weight.t(), s)]
        if cfg.kv_heads % s == 0:
            fam["attention_heads"] += [_by_copy(a.k_proj.weight, s), _by_copy(a.v_proj.weight, s)]
        if cfg.is_moe:
            f = b.ffn
            fam["ffn_neurons"] += [_expert_rows(f.gate_proj, s), _expert_rows(f.up_proj, s),
                                   _expert_rows(f.down_proj.transpose(1, 2), s)]
            fam["residual"].append(_by_copy(f.router.weight.t(), s))
        else:
            f = b.ffn
            fam["ffn_neurons"] += [_by_copy(f.gate_proj.weight, s), _by_copy(f.up_proj.weight, s),
                                   _by_copy(f.down_proj.weight.t(), s)]
    fam["residual"].append(_by_copy(model.embed.weight.t(), s))
    if model.lm_head.weight is not model.embed.weight:
        fam["residual"].append(_by_copy(model.lm_head.weight.t(), s))
    norms = [b.attention_norm.weight for b in model.blocks] + [b.ffn_norm.weight for b in model.blocks] + [model.norm.weight]
    fam["residual"].append(_by_copy(torch.stack(norms, dim=1), s))  # (D, n_norms): one vector per residual dim
    return fam


@torch.no_grad()
def measure_clone_divergence(model: nn.Module, scale_factor: int) -> dict[str, float]:
    """Median relative distance between cloned units, per kind, and "min" over kinds; {} when scale_factor < 2
    (nothing was cloned). Reads the live model in place (any dtype, DDP/compile wrappers allowed), no copy."""
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
        return CheckResult(NAME, True, "no clone-divergence records with cloned units to judge", {"evals": len(history)})
    metrics: dict = {"evals": len(history), "latest": {}, "peak": {}, "limits": limits.__dict__.copy()}
    stalled, relocking = [], []
    for k in kinds:
        values = [h[k] for h in history if k in h]
        latest, peak = values[-1], max(values)
        metrics["latest"][k], metrics["peak"][k] = latest, peak
        if len(values) >= limits.min_evals and latest < limits.floor:
            stalled.append(f"{k} {latest:.2e} after {len(values)} evals (floor {limits.floor:.0e})")
        elif peak >= limits.floor and latest < limits.relock_fraction * peak:
            relocking.append(f"{k} fell to {latest:.3g} from its maximum {peak:.3g} (limit {limits.relock_fraction:g} "
                             f"x maximum)")
    if stalled:
        msg = f"cloned units have not diverged: {'; '.join(stalled)}."
        return CheckResult(NAME, False, f"{msg} Fix: {FIX_STALLED}.", metrics, FIX_STALLED)
    if relocking:
        msg = f"cloned units are re-locking: {'; '.join(relocking)}."
        return CheckResult(NAME, False, f"{msg} Fix: {FIX_RELOCK}.", metrics, FIX_RELOCK)
    figures = ", ".join(f"{k} {metrics['latest'][k]:.3g} (max {metrics['peak'][k]:.3g})" for k in kinds)
    return CheckResult(NAME, True, f"clones keep diverging after {len(history)} evals: {figures}", metrics)

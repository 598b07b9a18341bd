"""Symmetry breaking: cloned heads, FFN neurons and residual dimensions, and identical experts, must receive
different gradients from the training objective on real tokens, or they stay copies forever.
GROWTH_VERIFICATION.md section 3."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from config import TrainConfig
from transfer.checks import stream
from transfer.checks.clones import CloneGroups, by_groups, residual_groups
from transfer.checks.objective import ObjectiveGradients, objective_gradients
from transfer.checks.pair import require_tokens
from transfer.checks.results import FIX_COLLAPSE, FIX_SYMMETRY, CheckResult

NAME = "Symmetry breaking"
FIX_SCALE = "pass the scale factor the model was grown by"
# Headline figures; the limit of each is in the comment, and the one reported is the first criterion that fails.
Q_SMALLEST = "smallest relative gradient difference of cloned unit pairs"  # >= identical_below
Q_MEDIAN = "median relative gradient difference of cloned unit pairs"  # >= min_relative_difference
Q_LATER = "smallest relative gradient difference of cloned unit pairs in inserted blocks at step 2"  # >= identical_below
Q_TWINS = "pairs of identical experts with identical gradients"  # <= 0
Q_TESTED = "cloned unit pairs that received gradient"  # >= 1
Q_EXPERTS = "smallest relative gradient difference of identical experts"  # >= identical_below
Q_NONE = "cloned units or identical experts to compare: none"  # nothing measured, no limit


@dataclass(frozen=True)
class SymmetryLimits:
    min_relative_difference: float = 1e-3  # the median pair's relative gradient difference must reach this
    identical_below: float | None = None  # "equal up to rounding"; None: 1e3 * eps of the measured dtype


@dataclass
class SymmetryStats:
    scale_factor: int
    eps: float  # machine epsilon of the dtype the gradients were computed in
    families: list[tuple[str, Tensor]] = field(default_factory=list)  # (label, relative difference per tested pair)
    pairs_without_gradient: int = 0  # both gradients exactly zero: nothing reached them, untested
    expert_pairs: list[tuple[str, float]] = field(default_factory=list)  # identical experts: (label, relative difference)
    loss: float | None = None
    has_clones: bool = True  # False: width unchanged and no experts, nothing to compare
    later_families: list[tuple[str, Tensor]] = field(default_factory=list)  # inserted blocks, at step 2
    grouping: str = ""  # how the copies were found (clones.CloneGroups.layout)


def infer_scale_factor(model: nn.Module) -> int:
    """The largest s for which the embedding's columns come in s equal copies, in any order (1 if none)."""
    e = model.embed.weight.detach()
    d = e.shape[1]
    for s in range(d, 1, -1):
        if d % s == 0 and residual_groups(e, s) is not None:
            return s
    return 1


def scale_problem(model: nn.Module, s: int) -> str | None:
    cfg = model.config
    if cfg.dim % s or cfg.n_heads % s or cfg.hidden_dim % s:
        return f"scale_factor {s} does not divide the model's widths (dim {cfg.dim}, {cfg.n_heads} heads, FFN {cfg.hidden_dim})"
    return None


def measure_symmetry(model: nn.Module, gradients: ObjectiveGradients, s: int,
                     later: dict[str, Tensor] | None = None, dtype: torch.dtype | None = None) -> SymmetryStats:
    """Relative gradient difference of every pair of copies of every cloned unit, and of identical experts. A
    block whose cloned units got no gradient at all at step 1 (an inserted identity block) is judged on `later`,
    the gradients at the step where they first arrive (the trainability check's), when given. `gradients` holds
    every parameter's step-1 gradient (computed in `dtype`, default the model's); SymmetryMeter reads them one at
    a time instead, as objective_gradients hands them over."""
    meter = SymmetryMeter(model, s, dtype or model.embed.weight.dtype)
    for name, grad in gradients.grads.items():
        meter(name, grad)
    return meter.finish(gradients.ce, later)


class SymmetryMeter:
    """measure_symmetry fed one gradient at a time (objective_gradients(..., consume=meter)): each block's cloned
    families are compared as soon as their gradients are in and dropped, so it holds one block's at most."""

    def __init__(self, model: nn.Module, s: int, dtype: torch.dtype):
        self.model, self.s, self.cfg = model, s, model.config
        self.stats = SymmetryStats(s, torch.finfo(dtype).eps)
        self.groups = CloneGroups(model, s) if s > 1 else None
        if self.groups is not None:
            self.stats.grouping = self.groups.layout() if self.groups.found else "positional (copies not found by their weights)"
        self.twins = {j: _identical_experts(b) for j, b in enumerate(model.blocks)} if self.cfg.is_moe else {}
        self.families = {j: set(_family_parameters(model, j)) for j in range(self.cfg.n_layers)}
        self.pending: dict[int, dict[str, Tensor]] = {}
        self.blocks: dict[int, list[tuple[str, Tensor, Tensor]]] = {}  # j -> (label, rel, zero) at step 1
        self.silent: set[int] = set()  # blocks whose cloned-unit weights all got exactly zero gradient at step 1
        self.residual: tuple[str, Tensor, Tensor] | None = None
        self.expert_pairs: dict[int, list[tuple[str, float]]] = {}  # j -> identical experts' (label, difference)

    def __call__(self, name: str, grad: Tensor) -> None:
        if name == "embed.weight" and self.groups is not None:
            self.residual = (RESIDUAL_LABEL, *_column_differences(grad, self.groups.residual))
            return
        if not name.startswith("blocks."):
            return
        j = int(name.split(".")[1])
        if name not in self.families[j]:
            return
        got = self.pending.setdefault(j, {})
        got[name] = grad
        if len(got) == len(self.families[j]):
            self._block(j, self.pending.pop(j))

    def _block(self, j: int, grads: dict[str, Tensor]) -> None:
        if all(not bool(g.any()) for g in grads.values()):
            self.silent.add(j)
        if self.groups is not None:
            self.blocks[j] = [(label, *_relative_differences(g)) for label, g in
                              _clone_families(self.model, grads, self.s, self.groups, [j], residual=False)]
        gate = grads[f"blocks.{j}.ffn.gate_proj"].flatten(1) if self.cfg.is_moe else None
        self.expert_pairs[j] = []
        for e1, e2 in self.twins.get(j, []):
            scale = max(gate[e1].norm().item(), gate[e2].norm().item())
            if scale == 0:  # neither expert got a token: untested here (the router check sees dead experts)
                self.stats.pairs_without_gradient += 1
            else:
                self.expert_pairs[j].append((f"block {j} experts {e1} and {e2}", (gate[e1] - gate[e2]).norm().item() / scale))

    def finish(self, loss: float | None, later: dict[str, Tensor] | None = None) -> SymmetryStats:
        """The stats, with the blocks silent at step 1 judged on `later` where it holds their gradients."""
        stats, later = self.stats, later or {}
        stats.loss = loss
        stats.expert_pairs = [p for j in sorted(self.expert_pairs) for p in self.expert_pairs[j]]
        if self.groups is None:
            return stats
        waiting = [j for j in sorted(self.silent) if all(n in later for n in self.families[j])]
        found = ([self.residual] if self.residual else []) + [f for j in sorted(self.blocks) if j not in waiting
                                                              for f in self.blocks[j]]
        for label, rel, zero in found:
            stats.pairs_without_gradient += int(zero.sum())
            stats.families.append((label, rel[~zero]))
        for label, g in _clone_families(self.model, later, self.s, self.groups, waiting, residual=False):
            rel, zero = _relative_differences(g)
            stats.pairs_without_gradient += int(zero.sum())
            stats.later_families.append((f"{label} at step 2", rel[~zero]))
        return stats


def _family_parameters(model: nn.Module, j: int) -> list[str]:
    suffix = "" if model.config.is_moe else ".weight"
    return [f"blocks.{j}.attention.{p}_proj.weight" for p in "qkv"] + [f"blocks.{j}.ffn.gate_proj{suffix}"]


def _clone_families(model: nn.Module, grads: dict[str, Tensor], s: int, groups: CloneGroups,
                    blocks: list[int] | None = None, residual: bool = True) -> list[tuple[str, Tensor | list[Tensor]]]:
    """(label, grads shaped (s, units, ...), or a list of such pieces: an MoE block's experts) for every family of
    width clones, the copies of each unit found by what they compute (CloneGroups), not by position; only `blocks`
    (default all) and, with residual, the embedding's columns."""
    cfg = model.config
    fams = [(RESIDUAL_LABEL, by_groups(grads["embed.weight"].t(), groups.residual))] if residual else []
    for j in range(cfg.n_layers) if blocks is None else blocks:
        for proj, g_heads in (("q", groups.heads[j]), ("k", groups.kv_heads[j]), ("v", groups.kv_heads[j])):
            if g_heads is None:  # a single shared KV head (MQA) kept as it is: nothing cloned
                continue
            fams.append((f"block {j} {proj}-heads", by_groups(grads[f"blocks.{j}.attention.{proj}_proj.weight"], g_heads)))
        if cfg.is_moe:  # per expert: neuron i of expert e and its copies, one piece per expert (never gathered whole)
            g = grads[f"blocks.{j}.ffn.gate_proj"]
            g = [by_groups(g[e], groups.neurons[j][e]) for e in range(len(g))]
        else:
            g = by_groups(grads[f"blocks.{j}.ffn.gate_proj.weight"], groups.neurons[j])
        fams.append((f"block {j} FFN neurons", g))
    return fams


RESIDUAL_LABEL = "residual dims (embedding columns)"


def _column_differences(grad: Tensor, groups: Tensor, rows: int = 4096) -> tuple[Tensor, Tensor]:
    """_relative_differences of the embedding gradient's columns grouped as copies (the residual family), summed over
    a slab of rows at a time: a (V, D) gradient is never gathered whole."""
    s = groups.shape[0]
    a, b = torch.triu_indices(s, s, offset=1)
    diff = norms = 0
    for i in range(0, grad.shape[0], rows):
        g = by_groups(grad[i:i + rows].t(), groups).flatten(2)  # (s, n, rows)
        diff = diff + (g[a] - g[b]).pow(2).sum(-1)
        norms = norms + g.pow(2).sum(-1)
    norms = norms.sqrt()
    scale = torch.maximum(norms[a], norms[b])
    zero = scale == 0
    return (diff.sqrt() / scale.clamp(min=1e-300)).flatten(), zero.flatten()


def _relative_differences(g: Tensor | list[Tensor]) -> tuple[Tensor, Tensor]:
    """For g (s, units, ...): |g_a - g_b| / max(|g_a|, |g_b|) for every unit and every pair of copies a < b,
    and a mask of pairs where both gradients are exactly zero (nothing reached them: untested, not identical).
    A list of such pieces gives theirs in turn. One pair's difference at a time: no gathered copy of g."""
    if isinstance(g, list):
        parts = [_relative_differences(piece) for piece in g]
        return torch.cat([r for r, _ in parts]), torch.cat([z for _, z in parts])
    g = g.flatten(2)
    pairs = [(a, b) for a in range(g.shape[0]) for b in range(a + 1, g.shape[0])]
    norms = g.norm(dim=-1)  # (s, units)
    diff = torch.stack([(g[a] - g[b]).norm(dim=-1) for a, b in pairs])  # (pairs, units)
    scale = torch.stack([torch.maximum(norms[a], norms[b]) for a, b in pairs])
    zero = scale == 0
    return (diff / scale.clamp(min=1e-300)).flatten(), zero.flatten()


def _identical_experts(block: nn.Module, probes: int = 64) -> list[tuple[int, int]]:
    """Pairs (a < b) of experts of an MoE block whose weights are exactly equal (e.g. right after upcycling).
    Experts are grouped by the values at a few fixed places (equal experts hold equal values there), and each is
    compared whole (torch.equal) with the first of each class of its group: equality is transitive, so at most a
    few comparisons per expert, and the weights are never copied."""
    f = block.ffn
    weights = [t.detach() for t in (f.gate_proj, f.up_proj, f.down_proj)]
    n = len(weights[0])
    places = [torch.linspace(0, w[0].numel() - 1, probes).long().unique().to(w.device) for w in weights]
    groups: dict[bytes, list[list[int]]] = {}
    for e in range(n):
        key = b"".join(w[e].flatten()[i].cpu().view(torch.uint8).numpy().tobytes() for w, i in zip(weights, places))
        classes = groups.setdefault(key, [])
        same = next((c for c in classes if all(torch.equal(w[c[0]], w[e]) for w in weights)), None)
        if same is None:
            classes.append([e])
        else:
            same.append(e)
    return sorted((a, b) for classes in groups.values() for c in classes for i, a in enumerate(c) for b in c[i + 1:])


def judge_symmetry(stats: SymmetryStats, limits: SymmetryLimits = SymmetryLimits()) -> CheckResult:
    """No pair identical up to rounding, the median pair's difference at least min_relative_difference,
    identical experts told apart, and something tested at all when the width grew."""
    if not stats.has_clones:
        return CheckResult(NAME, True, "width unchanged and no experts: no cloned units to compare",
                           quantity=Q_NONE)
    # "Identical" = equal up to rounding: pure clones differ by 0 to ~1e-16 in float64. A threshold on each
    # pair's difference would be wrong the other way: among thousands of noisy pairs a few differ little by
    # chance, so the noise strength is judged on the median pair instead.
    identical_below = limits.identical_below if limits.identical_below is not None else 1e3 * stats.eps
    min_rel = limits.min_relative_difference
    r = torch.cat([rel for _, rel in stats.families]) if stats.families else torch.zeros(0, dtype=torch.float64)
    # Inserted blocks' clones first get gradient at step 2, where their difference scales with that first step
    # (~1e-5 at warm-up's lr for noisy copies, exactly 0 for pure ones): they are held to "not identical" only.
    later = torch.cat([rel for _, rel in stats.later_families]) if stats.later_families else torch.zeros(0, dtype=torch.float64)
    every = torch.cat([r, later])
    tested, identical, identical_later = len(every), int((r < identical_below).sum()), int((later < identical_below).sum())
    twins = [label for label, rel in stats.expert_pairs if rel < identical_below]
    median = r.median().item() if len(r) else None
    metrics = {"scale_factor": stats.scale_factor, "pairs_tested": tested + len(stats.expert_pairs),
               "pairs_identical": identical + len(twins), "pairs_without_gradient": stats.pairs_without_gradient,
               "min_relative_difference": every.min().item() if tested else None, "median_relative_difference": median,
               "later_pairs_tested": len(later), "later_median_relative_difference": later.median().item() if len(later) else None,
               "grouping": stats.grouping,
               "limit": min_rel, "identical_below": identical_below,
               "identical_expert_pairs_tested": len(stats.expert_pairs), "loss": stats.loss}
    metrics["pairs_identical"] += identical_later
    problems, fix = [], FIX_SYMMETRY
    if identical:
        first = next(label for label, rel in stats.families if (rel < identical_below).any())
        problems.append(f"{identical} of {len(r)} cloned unit pairs receive identical gradients (relative difference "
                        f"{r.min().item():.1e}, below {identical_below:.0e}: equal up to rounding), first in {first}: "
                        f"the copies would stay identical through training and the added width would be wasted.")
    elif median is not None and median < min_rel:
        problems.append(f"cloned units' gradients differ by a median {median:.1e} relative (limit >= {min_rel:.0e}): "
                        f"the symmetry-breaking noise is too weak to make the copies diverge in bf16/fp32 training.")
    if identical_later:
        first = next(label for label, rel in stats.later_families if (rel < identical_below).any())
        problems.append(f"{identical_later} of {len(later)} cloned unit pairs in inserted blocks receive identical "
                        f"gradients at step 2, where they first get any (relative difference {later.min().item():.1e}, "
                        f"below {identical_below:.0e}), first in {first}: their copies are pure clones (equal rows) "
                        f"and would stay identical through training.")
    if twins:
        problems.append(f"identical experts receive identical gradients ({'; '.join(twins[:3])}"
                        f"{' ...' if len(twins) > 3 else ''}): the router sends them the same tokens.")
        if len(problems) == 1:
            fix = FIX_COLLAPSE
    if tested == 0 and stats.scale_factor > 1:
        problems.append("no gradient reached any cloned unit, so symmetry breaking cannot be shown.")
    headline = _headline(stats, r, every, twins, identical_below, min_rel)
    if problems:
        return CheckResult(NAME, False, " ".join(problems) + f" Fix: {fix}.", metrics, fix, **headline)
    return CheckResult(NAME, True, _ok_message(stats, r, median, min_rel), metrics, **headline)


def _headline(stats: SymmetryStats, r: Tensor, every: Tensor, twins: list[str], identical_below: float,
              min_rel: float) -> dict:
    """The first failing criterion in the order the verdict reports them, else the main one that applies."""
    if len(r) and r.min().item() < identical_below:
        return dict(quantity=Q_SMALLEST, value=r.min().item(), limit=identical_below, higher_is_better=True)
    if len(r) and r.median().item() < min_rel:
        return dict(quantity=Q_MEDIAN, value=r.median().item(), limit=min_rel, higher_is_better=True)
    if len(every) and every.min().item() < identical_below:
        return dict(quantity=Q_LATER, value=every.min().item(), limit=identical_below, higher_is_better=True)
    if len(r):
        if not twins:
            return dict(quantity=Q_MEDIAN, value=r.median().item(), limit=min_rel, higher_is_better=True)
    if twins:
        return dict(quantity=Q_TWINS, value=len(twins), limit=0)
    if stats.scale_factor > 1:
        return dict(quantity=Q_TESTED, value=0, limit=1, higher_is_better=True)
    if stats.expert_pairs:
        return dict(quantity=Q_EXPERTS, value=min(rel for _, rel in stats.expert_pairs), limit=identical_below,
                    higher_is_better=True)
    return dict(quantity=Q_NONE)


def _ok_message(stats: SymmetryStats, r: Tensor, median: float | None, min_rel: float) -> str:
    later = sum(len(rel) for _, rel in stats.later_families)
    at_step2 = (f"; {later} pairs in inserted blocks, judged at step 2 where they first get gradient, all differ "
                f"(smallest {min(rel.min().item() for _, rel in stats.later_families if len(rel)):.1e})" if later else "")
    if len(r):
        return (f"{len(r)} cloned unit pairs all receive different gradients (median relative difference "
                f"{median:.2e}, limit {min_rel:.0e}; smallest {r.min().item():.1e}){at_step2}; "
                f"{stats.pairs_without_gradient} pairs received no gradient (idle experts, identity blocks not "
                f"reached)")
    if stats.expert_pairs:
        return f"{len(stats.expert_pairs)} pairs of identical experts all receive different gradients (different tokens)"
    return "no cloned units or identical experts with gradients to compare"


@stream.reusing_blocks
def check_symmetry_breaking(new_model: nn.Module, tokens: Tensor, scale_factor: int | None = None,
                            min_relative_difference: float = 1e-3, max_sequences: int = 4,
                            dtype: torch.dtype = torch.float64, train_config: TrainConfig | None = None) -> CheckResult:
    """Gradients of the training objective on real tokens (the first max_sequences rows): no cloned head, FFN
    neuron or residual dimension may get the same gradient as a copy of it (equal up to rounding), the median
    relative difference must reach min_relative_difference, and identical experts must not get identical
    gradients (they would if the router sent them the same tokens). scale_factor=None reads it off the tiled
    embedding."""
    require_tokens(tokens)
    s = scale_factor or infer_scale_factor(new_model)
    limits = SymmetryLimits(min_relative_difference)
    if scale_problem(new_model, s) or (s == 1 and not new_model.config.is_moe):  # nothing to differentiate
        return symmetry_result(new_model, None, s, limits)
    # the step inserted blocks are judged at
    from transfer.checks.trainability import FirstGradient, keeps_block_gradients, measure_trainability

    tc = train_config or TrainConfig()
    tokens = tokens[:max_sequences].to(new_model.embed.weight.device)
    meter = SymmetryMeter(new_model, s, dtype)
    first = FirstGradient(new_model, tokens, keeps_block_gradients(new_model, dtype))
    grads = objective_gradients(new_model, tokens, tc, block_io=True, dtype=dtype,
                                consume=lambda n, g: (meter(n, g), first(n, g)))
    later = measure_trainability(new_model, tokens, tc, first=grads, dtype=dtype, meter=first).later_grads \
        if meter.silent else None
    return symmetry_result(new_model, None, s, limits, stats=meter.finish(grads.ce, later))


def symmetry_result(model: nn.Module, gradients: ObjectiveGradients | None, s: int, limits: SymmetryLimits,
                    later: dict[str, Tensor] | None = None, stats: SymmetryStats | None = None) -> CheckResult:
    """The verdict for width factor s from gradients of the objective, or from `stats` a SymmetryMeter measured
    (neither when there is nothing to compare)."""
    problem = scale_problem(model, s)
    if problem:
        return CheckResult(NAME, False, f"{problem}. Fix: {FIX_SCALE}.", {"scale_factor": s}, FIX_SCALE,
                           quantity="scale factor divides the model's widths")  # a yes/no: no figure, no limit
    if s == 1 and not model.config.is_moe:
        return judge_symmetry(SymmetryStats(1, 0.0, has_clones=False), limits)
    return judge_symmetry(stats if stats is not None else measure_symmetry(model, gradients, s, later), limits)

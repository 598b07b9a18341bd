"""Trainability: every weight of the grown model can receive gradient from the training objective within a few
optimisation steps. A growth that zeroes both factors of a product (o_proj and v_proj, down_proj and up_proj, a
norm weight, a whole head or expert) preserves the function exactly and passes the other four checks, yet no
gradient ever reaches those weights and weight decay holds them at zero. GROWTH_VERIFICATION.md section 5.

One step is not enough: an inserted identity block's o_proj and down_proj are zero, so its q, k, v, gate, up and
norm weights get exactly zero gradient at step 1 and a nonzero one once the output projections have moved.
The check therefore evaluates the gradient, takes AdamW's first step (lr * g / (|g| + eps), decoupled weight
decay on matrices, at the pipeline's first learning rate: warm-up step 1), and evaluates again, on float64
copies and the same real tokens. It judges units (a head, a neuron, an expert, a row, a norm vector), and only
those the batch reached: an expert that got no token, the embedding row of an id absent from the batch, is
reported as idle, never as dead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from config import TrainConfig
from models import expert_load
from transfer.checks.labels import parameter_place
from transfer.checks import stream
from transfer.checks.objective import (ObjectiveGradients, block_backward, objective_gradients, parameter_names,
                                       router_loss)
from transfer.checks.ownership import FIX_OWNERSHIP, Ownership, lookup, measure_ownership
from transfer.checks.pair import require_tokens
from transfer.checks.results import FIX_TRAINABILITY, CheckResult

NAME = "Trainability"
QUANTITY = "weights the batch reached that never receive gradient"  # limit: <= max_dead_weights
FIX_INHERITED = ("the growth copied them faithfully: re-initialise those units in the source model (or in the "
                 "grown one) with small random weights on one side of each product, then grow again")
STEP_SLAB = 1 << 20  # elements of AdamW's step computed at once (_adamw_first_step)
# Sequences of the batch the later evaluation of waiting blocks reads (their stepped inputs, pulled by their step-1
# output gradients): an inserted block's units and clones only have to show that gradient arrives and differs, which
# half the batch shows as well as all of it; the step-1 gradient, which everything else is judged on, reads all.
LATER_SEQUENCES = 2
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which training.loop.make_optimizer keeps


@dataclass(frozen=True)
class TrainabilityLimits:
    max_dead_weights: int = 0  # reached weights in units that received no gradient at any evaluation


@dataclass
class DeadUnits:
    """Dead weights of one parameter, grouped into the units a user thinks in (heads, neurons, experts)."""

    place: str  # "block 1 (inserted identity copy of old block 0)", or "model" outside the blocks
    module: str  # "attention.v_proj"
    unit: str  # head, kv head, neuron, expert, vector (a norm weight), token row, weight
    dead_units: list[int]  # units (with weights the batch reached) that never received gradient
    n_units: int
    dead_weights: int
    judged_weights: int  # weights the batch reached at every evaluation
    inherited: bool = False  # the source model's unit is dead too (or idle there and all zero): not growth's doing

    def describe(self) -> str:
        """"attention.v_proj (1 of 8 kv heads: 1; 512 of 4096 weights)": which units, when not all of them."""
        which = (f": {', '.join(map(str, self.dead_units[:8]))}{' ...' if len(self.dead_units) > 8 else ''}"
                 if 0 < len(self.dead_units) < self.n_units else "")
        units = "the whole vector" if self.unit == "vector" else f"{len(self.dead_units)} of {self.n_units} {self.unit}s{which}"
        return f"{self.module} ({units}; {self.dead_weights} of {self.judged_weights} weights)"


@dataclass
class ParameterGradient:
    name: str
    weights: int
    judged: int  # reached by the batch at every evaluation of its gradient
    alive_after: list[int]  # judged weights of units that received gradient at some evaluation <= t, t = 1, 2, ...
    relative_rms: list[float | None]  # RMS gradient over judged weights / the model's RMS gradient at step 1


@dataclass
class TrainabilityStats:
    steps: int  # evaluations made: stops early once every reached weight has had gradient
    lr: float
    parameters: list[ParameterGradient] = field(default_factory=list)
    dead: list[DeadUnits] = field(default_factory=list)
    idle_embedding_rows: int = 0
    idle_experts: list[str] = field(default_factory=list)  # "block 3 expert 5"
    loss: float | None = None
    zero_below: float = 0.0  # unit RMS gradient / model RMS gradient at step 1 at or below which a unit got none
    weakest_unit: float | None = None  # smallest such ratio of a unit when it first received gradient: the margin
    ownership: Ownership | None = None  # places the optimizer cannot move (frozen, shared, not parameters)
    later_grads: dict[str, Tensor] = field(default_factory=dict)  # gradient at the step a parameter waited for


# The step where the caller names no learning rate: a warm-up's first step is peak / warmup_steps, 6e-6 at
# TrainConfig's defaults for the grown stage (3e-4 / 50); the pipeline always passes its stage's own.
DEFAULT_STEP_LR = 6e-6


def first_step_lr(phase_lr: float, tc: TrainConfig) -> float:
    """The learning rate of a phase's first step: warm-up step 1 of training.loop.lr_at, phase_lr / warmup_steps."""
    return phase_lr / tc.warmup_steps if tc.warmup_steps > 1 else phase_lr


# Step-1 gradients of the blocks are kept for AdamW's step when they take at most this many bytes; above it (a
# model of ~270 M parameters in float64) a block's are recomputed from its kept input and output gradient when the
# step needs them, which bounds the check's memory by one block's at the cost of one more backward of the blocks.
KEEP_GRADIENT_BYTES = 2 << 30


class FirstGradient:
    """What the trainability check reads from the objective's first gradient, fed one parameter at a time
    (objective_gradients(..., consume=meter)): each unit's RMS, each parameter's sum of squares, and the gradients
    AdamW's first step needs: all of them when `keep`, else only the embedding's nonzero rows (the rest are
    recomputed if a step needs them)."""

    def __init__(self, model: nn.Module, tokens: Tensor, keep: bool = True):
        self.cfg, self.keep = model.config, keep
        self.rows = tokens[:, :-1].unique()  # the embedding rows the batch's inputs read
        self.unit_rms: dict[str, Tensor] = {}
        self.squares: dict[str, Tensor] = {}
        self.sizes: dict[str, int] = {}
        self.grads: dict[str, Tensor] = {}
        self.embed_rows: Tensor | None = None  # without keep: the embedding gradient's rows of the batch's ids

    def __call__(self, name: str, grad: Tensor) -> None:
        self.unit_rms[name] = _unit_rms(name, grad, self.cfg)
        self.squares[name], self.sizes[name] = torch.linalg.vector_norm(grad).square(), grad.numel()  # no temporary
        if self.keep:
            self.grads[name] = grad
        elif name == "embed.weight":  # only these rows are stepped (Stepper.inputs)
            self.embed_rows = grad[self.rows]


def keeps_block_gradients(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the step-1 gradients of every block fit KEEP_GRADIENT_BYTES in `dtype` (then all are kept)."""
    per = torch.finfo(dtype).bits // 8
    return per * sum(lookup(model, n).numel() for n in parameter_names(model) if n.startswith("blocks.")) <= KEEP_GRADIENT_BYTES


def measure_trainability(model: nn.Module, tokens: Tensor, tc: TrainConfig, steps: int = 2, lr: float | None = None,
                         layout: list[tuple[int, bool]] | None = None, first: ObjectiveGradients | None = None,
                         ownership: Ownership | None = None, dtype: torch.dtype | None = None,
                         meter: FirstGradient | None = None) -> TrainabilityStats:
    """Gradient at the model's weights (or `first`, already computed on the same tokens, read by `meter` as it was
    computed or from first.grads), then after each AdamW first step (lr default: DEFAULT_STEP_LR) until `steps`
    evaluations or until every reached unit has had gradient. Computed in `dtype` (default the model's) one block
    at a time; later evaluations differentiate only the parameters still waiting, and never modify `model`.

    Judged per unit (a head's rows, a neuron, an expert, a token row, a norm vector), over the weights the
    batch reached at every evaluation of that parameter: a unit receives gradient when the RMS of its gradient
    exceeds 1e3 * eps(dtype) times the model's RMS gradient at step 1. Below that it is rounding (identical
    experts give their router an LM gradient of ~1e-18 in float64) and an Adam step from it is ~1e-10 of the
    learning rate. Per unit, not per weight: single weights of a live unit can be arbitrarily small by chance
    (at dim 512 a few per million fall below the line), a unit's RMS cannot."""
    lr = DEFAULT_STEP_LR if lr is None else lr
    dt = dtype or lookup(model, "embed.weight").dtype
    if meter is None:
        meter = FirstGradient(model, tokens, keeps_block_gradients(model, dt))
        if first is not None and first.block_inputs is not None:
            for n, gr in first.grads.items():
                meter(n, gr)
        else:
            first = objective_gradients(model, tokens, tc, block_io=True, dtype=dt, consume=meter)
    g, cfg, names = first, model.config, parameter_names(model)
    squares = sum(meter.squares[n] for n in names)
    reference = (squares / sum(meter.sizes[n] for n in names)).sqrt().clamp(min=1e-300)
    zero_below = 1e3 * torch.finfo(dt).eps * reference
    judged = _reached_units(model, g)  # per parameter, (units,): reached at every evaluation of its gradient
    unit_rms = {n: meter.unit_rms[n] * judged[n] for n in names}
    first_alive = {n: (u > zero_below).to(torch.int8) for n, u in unit_rms.items()}  # 0: not yet
    weakest = min((u[u > zero_below].min().item() for u in unit_rms.values() if (u > zero_below).any()), default=None)
    rms = {n: [_relative_rms(u, judged[n], reference)] for n, u in unit_rms.items()}
    stepper = _Stepper(model, tokens, tc, lr, dt, first, meter)
    done, waited = 1, []
    while done < steps:
        waiting = [n for n in names if (judged[n] & (first_alive[n] == 0)).any()]
        if not waiting:
            break
        local = _local_blocks(waiting, first)
        if local is None:
            g = objective_gradients(model, tokens, tc, values=stepper.whole(), wrt=waiting, dtype=dt)
        else:
            inputs = stepper.inputs(max(local), LATER_SEQUENCES)  # stepped once, before the blocks step again
            g = _block_gradients(model, first, stepper.blocks(local), waiting, local, tc, inputs)
        stepper.latest.update(g.grads)
        done += 1
        waited = waited or waiting
        reached = _reached_units(model, g)
        for n in names:
            if n not in waiting:
                rms[n].append(None)
                continue
            judged[n] = judged[n] & reached[n]
            u = _unit_rms(n, g.grads[n], cfg) * judged[n]
            newly = (first_alive[n] == 0) & (u > zero_below)
            first_alive[n][newly] = done
            if newly.any():
                weakest = min(u[newly].min().item(), weakest if weakest is not None else float("inf"))
            rms[n].append(_relative_rms(u, judged[n], reference))
    stats = TrainabilityStats(done, lr, loss=g.ce, zero_below=(zero_below / reference).item(),
                              weakest_unit=None if weakest is None else weakest / reference.item(),
                              later_grads={n: stepper.latest[n] for n in waited})
    for n in names:
        v = lookup(model, n)
        per_unit = v.numel() // len(judged[n])
        alive = [int(((first_alive[n] > 0) & (first_alive[n] <= t) & judged[n]).sum()) * per_unit for t in range(1, done + 1)]
        stats.parameters.append(ParameterGradient(n, v.numel(), int(judged[n].sum()) * per_unit, alive, rms[n]))
        dead = judged[n] & (first_alive[n] == 0)
        if dead.any():
            place, module = parameter_place(n, layout)
            stats.dead.append(DeadUnits(place, module, _unit_kind(n, v), dead.nonzero().flatten().tolist(), len(dead),
                                        int(dead.sum()) * per_unit, int(judged[n].sum()) * per_unit))
    if "lm_head.weight" in names:  # untied: the embedding gets gradient only through the rows the batch holds
        stats.idle_embedding_rows = int((~judged["embed.weight"]).sum())
    stats.idle_experts = [f"block {j} expert {e}" for j in range(len(g.expert_tokens))
                          for e in (~judged[f"blocks.{j}.ffn.gate_proj"]).nonzero().flatten().tolist()]
    stats.ownership = _reached_ownership(ownership, judged)
    return stats


class _Stepper:
    """The weights after AdamW's first step, block by block: from the step-1 gradients the meter kept, or, for a
    block whose it did not keep, recomputed from that block's step-1 input and output gradient (the same
    operations, so the same values). Later steps step again from `latest`, the newest gradients."""

    def __init__(self, model: nn.Module, tokens: Tensor, tc: TrainConfig, lr: float, dtype: torch.dtype,
                 first: ObjectiveGradients, meter: FirstGradient):
        self.model, self.tokens, self.tc, self.lr, self.dtype, self.first = model, tokens, tc, lr, dtype, first
        self.latest = meter.grads  # name -> newest gradient (step 1's where kept)
        self.meter = meter
        self.values: dict[str, Tensor] = {}  # name -> stepped weights of the blocks a later step differentiates
        self._inputs: list[Tensor] | None = None

    def _step(self, name: str, grad: Tensor, again: bool = True, dtype: torch.dtype | None = None) -> Tensor:
        """AdamW's first step from the weights stepped so far (again) or from the model's own, in `dtype` (default
        the check's)."""
        if again and name in self.values:
            return _adamw_first_step(self.values[name], grad, self.lr, self.tc)
        w = stream.cast_weight(self.model, name, dtype or self.dtype, copy=True)  # private: stepped in place
        return _adamw_first_step(w, grad.to(w.dtype), self.lr, self.tc, out=w)

    def _block_grads(self, j: int) -> dict[str, Tensor]:
        """Block j's newest gradients: kept, or its step-1 gradients recomputed."""
        prefix = f"blocks.{j}."
        names = [n for n in parameter_names(self.model) if n.startswith(prefix)]
        if all(n in self.latest for n in names):
            return {n: self.latest[n] for n in names}
        cos, sin = stream.rope(self.model, self.tokens.shape[1] - 1, self.dtype)
        grads, _, _ = block_backward(stream.cast_block(self.model, j, self.dtype), {}, [n[len(prefix):] for n in names],
                                     self.first.block_inputs[j], self.first.block_output_grads[j], cos, sin,
                                     self.model.config.top_k, self.tc, input_grad=False)
        return {n: self.latest.get(n, grads[n[len(prefix):]]) for n in names}

    def blocks(self, local: list[int]) -> dict[str, Tensor]:
        """The stepped weights of the blocks in `local`, stepped once more from their newest gradients; a weight
        whose gradient is exactly zero and that no step has moved yet is left out (its block's own value is used:
        see _moves)."""
        for j in local:
            self.values.update({n: self._step(n, gr) for n, gr in self._block_grads(j).items()
                                if n in self.values or _moves(gr)})
        return self.values

    def inputs(self, last: int, rows: int | None = None) -> list[Tensor]:
        """Each block's input hidden state (up to block `last`) with every weight stepped once: blocks only, no LM
        head, no gradient. After the first step the residual stream is no longer exactly tiled, which is what lets
        noisy clones in an inserted block (equal on tiled input) tell themselves apart; pure clones stay equal on
        any input. In float32: the inputs only have to carry the first step's departure from tiling (relative
        ~1e-4, far above fp32 rounding), and pure clones stay bit-equal on any input; half the cost of float64.
        Of the first `rows` sequences of the batch (default all)."""
        if self._inputs is not None:
            return self._inputs
        ids = self.tokens[:rows, :-1]
        rows, where = ids.unique(return_inverse=True)  # stepping is elementwise: the batch's rows stepped alone
        kept = self.latest.get("embed.weight")
        # without kept gradients, the meter's rows of the whole batch's ids (sorted): these ids are among them
        grad_rows = kept[rows] if kept is not None else self.meter.embed_rows[torch.searchsorted(self.meter.rows, rows)]
        w = stream.cast_weight_rows(self.model, "embed.weight", rows, self.dtype)
        x, inputs = _adamw_first_step(w, grad_rows, self.lr, self.tc)[where].float(), []
        cos, sin = (t.float() for t in stream.rope(self.model, ids.shape[1], self.dtype))
        with torch.no_grad():
            for j in range(last + 1):
                inputs.append(x.to(self.dtype))
                prefix = f"blocks.{j}."
                stepped = {n[len(prefix):]: self._step(n, gr, again=False, dtype=torch.float32) if _moves(gr) else
                           stream.cast_weight(self.model, n, torch.float32) for n, gr in self._block_grads(j).items()}
                # every weight is passed, so the block copy is only the function: no float32 cast of it
                x, _ = functional_call(stream.cast_block(self.model, j, self.dtype), stepped, (x, cos, sin))
        self._inputs = inputs
        return inputs

    def whole(self) -> dict[str, Tensor]:
        """Every weight stepped once (a whole stepped copy: only when the waiting weights lie outside the blocks
        or in blocks the gradient does not reach, i.e. a broken model)."""
        edges = [n for n in parameter_names(self.model) if not n.startswith("blocks.")]
        missing = [n for n in edges if n not in self.latest]
        if missing:  # not kept at step 1 (a large model): the same gradient again, for these alone
            self.latest.update(objective_gradients(self.model, self.tokens, self.tc, wrt=missing, dtype=self.dtype).grads)
        values = {n: self._step(n, self.latest[n]) for n in edges}
        for j in range(self.model.config.n_layers):
            values.update({n: self._step(n, gr) for n, gr in self._block_grads(j).items()})
        self.values = values
        return values


def _reached_ownership(ownership: Ownership | None, judged: dict[str, Tensor]) -> Ownership | None:
    """The ownership findings that matter: a frozen weight only where the batch reached some unit of it."""
    if ownership is None:
        return None
    frozen = [n for n in ownership.frozen if n not in judged or bool(judged[n].any())]
    return Ownership(frozen, ownership.shared, ownership.not_parameters, ownership.overlapping, ownership.weights)


def _local_blocks(waiting: list[str], first: ObjectiveGradients) -> list[int] | None:
    """The blocks whose parameters wait, if every waiting parameter is in a block that the objective's gradient
    reaches (nonzero at its output); None when the whole model must be evaluated again."""
    if not all(n.startswith("blocks.") for n in waiting):
        return None
    blocks = sorted({int(n.split(".")[1]) for n in waiting})
    return blocks if all(bool(first.block_output_grads[j].any()) for j in blocks) else None


def _block_gradients(model: nn.Module, first: ObjectiveGradients, values: dict[str, Tensor], waiting: list[str],
                     blocks: list[int], tc: TrainConfig, inputs: list[Tensor] | None = None) -> ObjectiveGradients:
    """The waiting parameters' gradients, each block alone at its stepped weights (`values`), fed its stepped
    input and pulled by its step-1 output gradient (plus its own router loss): the step-2 gradient to first order
    in the step, at the cost of a forward and those blocks only. Exact zeros stay exact: a unit zero on both sides
    of its product gets none whatever its input and output gradient."""
    grads, expert_tokens, k = {}, list(first.expert_tokens), model.config.top_k
    inputs = first.block_inputs if inputs is None else inputs
    rows = len(inputs[0])  # the stepped inputs may hold the batch's first sequences only (LATER_SEQUENCES)
    dtype = first.block_inputs[0].dtype
    cos, sin = stream.rope(model, inputs[0].shape[1], dtype)
    for j in blocks:
        prefix = f"blocks.{j}."
        local = {n[len(prefix):]: v for n, v in values.items() if n.startswith(prefix)}
        names = [n for n in waiting if n.startswith(prefix)]
        block = stream.cast_block(model, j, dtype)
        g, _, logits = block_backward(block, local, [n[len(prefix):] for n in names], inputs[j],
                                      first.block_output_grads[j][:rows], cos, sin, k, tc, input_grad=False)
        if logits is not None:
            expert_tokens[j] = expert_load(logits.detach(), k)
        grads.update({n: torch.zeros_like(block.get_parameter(n[len(prefix):])) if g[n[len(prefix):]] is None
                      else g[n[len(prefix):]] for n in names})
    return ObjectiveGradients(grads, first.ce, first.total, expert_tokens, first.input_ids)


def _moves(grad: Tensor) -> bool:
    """Whether AdamW's step from this gradient moves the weight by more than weight decay. Where the gradient is
    exactly zero (an inserted block's q/k/v and experts' gate/up at step 1) decay alone scales the weight by
    1 - lr * weight_decay (1 - 6e-7 at the default step): a uniform scaling of a whole weight, which can neither
    make nor break a clone's symmetry nor silence a unit, so the later evaluation keeps the weight as it is and
    spares a stepped copy of the largest weights of every inserted block."""
    return bool(grad.any())


def _unit_rms(name: str, g: Tensor, cfg) -> Tensor:
    """(units,) RMS of each unit's gradient."""
    gu = _units(name, g, cfg)
    return torch.linalg.vector_norm(gu, dim=1) / gu.shape[1] ** 0.5


def _relative_rms(unit_rms: Tensor, judged: Tensor, reference: Tensor) -> float | None:
    """RMS gradient over the judged units (all of equal size) / the model's RMS gradient at step 1."""
    return (unit_rms[judged].pow(2).mean().sqrt() / reference).item() if judged.any() else None


def _reached_units(model: nn.Module, g: ObjectiveGradients) -> dict[str, Tensor]:
    """Per parameter, (units,) which units this evaluation's batch could reach: all, except embedding rows of
    ids absent from the input (an untied embedding gets gradient only through them) and experts that got no
    token. Reach is unit-aligned: whole rows, whole experts."""
    cfg = model.config
    reached = {n: torch.ones(_units(n, torch.empty(p.shape, device="meta"), cfg).shape[0], dtype=torch.bool,
                             device=p.device) for n, p in ((n, lookup(model, n)) for n in parameter_names(model))}
    if "lm_head.weight" in reached:  # untied: the embedding gets gradient only through the rows the batch holds
        rows = torch.zeros_like(reached["embed.weight"])
        rows[g.input_ids] = True
        reached["embed.weight"] = rows
    for j, tokens in enumerate(g.expert_tokens):
        for name in ("gate_proj", "up_proj", "down_proj"):
            reached[f"blocks.{j}.ffn.{name}"] = tokens > 0
    return reached


def _adamw_first_step(w: Tensor, g: Tensor, lr: float, tc: TrainConfig, out: Tensor | None = None) -> Tensor:
    """AdamW's first update (bias-corrected moments are g and g^squared), decay on matrices as make_optimizer:
    w (1 - lr decay) - lr g / (|g| + eps), written into `out` (w itself, when the caller owns it) or a new tensor.
    The denominator is made a slab of rows at a time: a temporary the size of a whole expert stack would be fresh
    memory on every call (the allocator returns large blocks to the system), and faulting its pages in costs
    more than the arithmetic."""
    decay = tc.weight_decay if w.dim() >= 2 else 0.0
    if out is None:
        out = torch.mul(w, 1 - lr * decay)
    elif decay:
        out.mul_(1 - lr * decay)
    rows = max(1, STEP_SLAB // max(1, out[0].numel())) if out.dim() else 1
    for o, gs in zip(out.split(rows), g.split(rows)) if out.dim() else [(out, g)]:
        o.addcdiv_(gs, gs.abs().add_(ADAM_EPS), value=-lr)
    return out


def _unit_kind(name: str, p: Tensor) -> str:
    key = name.removesuffix(".weight").split(".")[-1]
    if p.dim() == 1:
        return "vector"
    if p.dim() == 3:
        return "expert"
    return {"q_proj": "head", "k_proj": "kv head", "v_proj": "kv head", "o_proj": "head", "gate_proj": "neuron",
            "up_proj": "neuron", "down_proj": "neuron", "router": "expert", "embed": "token row",
            "lm_head": "token row"}.get(key, "weight")


def _units(name: str, t: Tensor, cfg) -> Tensor:
    """A parameter (or its gradient) viewed as (units, weights per unit), in the units of _unit_kind."""
    key = name.removesuffix(".weight").split(".")[-1]
    if t.dim() == 1:  # a norm weight: zeroed whole or not at all
        return t.view(1, -1)
    if t.dim() == 3:  # stacked experts (E, out, in)
        return t.flatten(1)
    if key == "q_proj":
        return t.view(cfg.n_heads, -1)
    if key in ("k_proj", "v_proj"):
        return t.view(cfg.kv_heads, -1)
    if key == "o_proj":  # (D, H * hd): a head is a block of columns
        return t.view(t.shape[0], cfg.n_heads, -1).transpose(0, 1).flatten(1)
    if key == "down_proj":
        return t.t()
    if key in ("gate_proj", "up_proj", "router", "embed", "lm_head"):
        return t
    return t.reshape(-1, 1)


def judge_trainability(stats: TrainabilityStats, limits: TrainabilityLimits = TrainabilityLimits()) -> CheckResult:
    """Fails when more reached weights than allowed never receive gradient or can never be updated (frozen,
    shared, not parameters); idle weights and findings inherited from the source model are only reported."""
    own, inherited = [d for d in stats.dead if not d.inherited], [d for d in stats.dead if d.inherited]
    unmovable = _unmovable_weights(stats.ownership)
    dead = sum(d.dead_weights for d in stats.dead) + unmovable
    weights = sum(p.weights for p in stats.parameters)
    judged = sum(p.judged for p in stats.parameters)
    alive_after = [sum(p.alive_after[t] for p in stats.parameters) for t in range(stats.steps)]
    last_rms = [next((x for x in reversed(p.relative_rms) if x is not None), None) for p in stats.parameters]
    metrics = {"steps": stats.steps, "lr": stats.lr, "weights": weights, "judged_weights": judged,
               "alive_after_step": alive_after, "dead_weights": dead, "limit": limits.max_dead_weights,
               "dead_units": [asdict(d) for d in stats.dead], "idle_embedding_rows": stats.idle_embedding_rows,
               "idle_experts": stats.idle_experts, "loss": stats.loss, "zero_below": stats.zero_below,
               "weakest_relative_gradient": min((x for x in last_rms if x is not None), default=None),
               "weakest_unit_gradient": stats.weakest_unit,
               "unmovable": stats.ownership.names() if stats.ownership else [], "unmovable_weights": unmovable,
               "inherited_dead_weights": sum(d.dead_weights for d in stats.dead if d.inherited)}
    notes = _idle_note(stats)
    headline = dict(quantity=QUANTITY, value=dead, limit=limits.max_dead_weights)
    if dead > limits.max_dead_weights:
        problems, fixes = [], []
        if unmovable:
            problems.append(f"{unmovable} weights the batch reaches can never be updated by the optimizer (limit "
                            f"{limits.max_dead_weights} such weights): {'; '.join(stats.ownership.problems())}.")
            fixes.append(FIX_OWNERSHIP)
        if own:
            problems.append(_dead_message(own, stats, limits))
            fixes.append(FIX_TRAINABILITY)
        if inherited:
            problems.append(_dead_message(inherited, stats, limits).replace(" weights reached", " weights, inherited "
                            "from the source model and not caused by growth (the source's unit is dead, or unused "
                            "and all zero, there too), reached", 1))
            fixes.append(FIX_INHERITED)
        fix = "; and ".join(fixes)
        msg = f"{' '.join(problems)}{notes} Fix: {fix}."
        return CheckResult(NAME, False, msg, metrics, fix, **headline)
    later = (f", the other {alive_after[-1] - alive_after[0]} after {stats.steps - 1} AdamW step(s) (lr {stats.lr:g})"
             if stats.steps > 1 else "")
    weakest = ("" if stats.weakest_unit is None else f"; the weakest unit's RMS gradient is {stats.weakest_unit:.1e} "
               f"of the model's (none at or below {stats.zero_below:.0e})")
    ok = (f"all {judged} weights the batch reached receive gradient within {stats.steps} step(s): {alive_after[0]} at "
          f"step 1{later}{weakest}; every place owns a trainable tensor.{notes}")
    return CheckResult(NAME, True, ok, metrics, **headline)


def _unmovable_weights(ownership: Ownership | None) -> int:
    """Weights in places the optimizer cannot move: every name listed, each counted once."""
    if ownership is None:
        return 0
    return sum(ownership.weights.get(n, 0) for n in ownership.names())


def _dead_message(dead: list[DeadUnits], stats: TrainabilityStats, limits: TrainabilityLimits) -> str:
    places = dict.fromkeys(d.place for d in dead)  # in model order
    listed = "; ".join(f"{p}: " + ", ".join(d.describe() for d in dead if d.place == p) for p in places)
    n = sum(d.dead_weights for d in dead)
    return (f"{n} weights reached by the batch never receive gradient within {stats.steps} "
            f"step{'s' if stats.steps > 1 else ''} (their unit's RMS gradient at most {stats.zero_below:.1e} of the "
            f"model's; limit {limits.max_dead_weights} such weights), so training cannot move them and weight decay "
            f"holds them where they are: {listed}.")


def mark_inherited(stats: TrainabilityStats, old: nn.Module, old_stats: TrainabilityStats,
                   layout: list[tuple[int, bool]]) -> None:
    """Flag each dead group of the grown model whose source block has the same module dead, or (an expert) has
    that expert unused by the batch and all zero in the source: a finding the growth inherited."""
    dead_old = {(d.place, d.module) for d in old_stats.dead}
    for d in stats.dead:
        if not d.place.startswith("block "):
            d.inherited = ("model", d.module) in dead_old
            continue
        src = layout[int(d.place.split()[1])][0]
        place = f"block {src}"
        if (place, d.module) in dead_old:
            d.inherited = True
        elif d.unit == "expert":
            d.inherited = all(_zero_in_source(old, src, d.module, e) for e in d.dead_units)


def _zero_in_source(old: nn.Module, src: int, module: str, expert: int) -> bool:
    """The source block's expert (or, for a dense source, its FFN) is all zero in every weight of its FFN."""
    f = old.blocks[src].ffn
    if old.config.is_moe:
        return all(not bool(w[expert].any()) for w in (f.gate_proj, f.up_proj, f.down_proj)) if expert < len(f.gate_proj) else False
    return not (bool(f.gate_proj.weight.any()) and bool(f.up_proj.weight.any()))


def _idle_note(stats: TrainabilityStats) -> str:
    parts = []
    if stats.idle_embedding_rows:
        parts.append(f"{stats.idle_embedding_rows} embedding rows of ids absent from the batch")
    if stats.idle_experts:
        parts.append(f"experts without tokens: {', '.join(stats.idle_experts[:6])}"
                     f"{' ...' if len(stats.idle_experts) > 6 else ''}")
    return f" Idle, not judged: {'; '.join(parts)}." if parts else ""


@stream.reusing_blocks
def check_trainability(new_model: nn.Module, tokens: Tensor, steps: int = 2, max_sequences: int = 4,
                       train_config: TrainConfig | None = None, lr: float | None = None,
                       dtype: torch.dtype = torch.float64) -> CheckResult:
    """Every weight of new_model that the first max_sequences rows of tokens reach receives gradient from the
    pipeline's objective (train_config's balance and z coefficients) within `steps` evaluations, AdamW's first
    step between them (lr, default DEFAULT_STEP_LR). Dead weights are listed by
    block, module and unit."""
    require_tokens(tokens)
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    ownership = measure_ownership(new_model)  # on the caller's model: the block copies own every tensor
    tokens = tokens[:max_sequences].to(lookup(new_model, "embed.weight").device)
    stats = measure_trainability(new_model, tokens, train_config or TrainConfig(), steps, lr, ownership=ownership,
                                 dtype=dtype)
    return judge_trainability(stats)

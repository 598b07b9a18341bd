"""Gradients of the pipeline's training objective on real tokens, without touching the model.

The symmetry and trainability checks read the same first gradient, so detailed_growth_check computes it
once. The objective is training.loop.lm_loss's (tests hold the two equal): next-token cross-entropy plus,
for an MoE, balance_coef * load-balancing loss + z_coef * router z-loss per block. It is rebuilt here from
the same pieces because the checks also need the routing of that very forward pass (which experts the
batch reached), and because training.loop will import from transfer.checks (clone divergence), so
transfer.checks must not import training.loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from config import TrainConfig
from models import expert_load, load_balancing_loss, router_z_loss


@dataclass
class ObjectiveGradients:
    """One evaluation of the objective's gradient."""

    grads: dict[str, Tensor]  # parameter name -> gradient (zeros where nothing arrived); only those asked for
    ce: float  # next-token cross-entropy
    total: float  # the objective the pipeline trains on
    expert_tokens: list[Tensor]  # per MoE block: (E,) token assignments routed to each expert
    input_ids: Tensor  # token ids fed to the model: the embedding rows this batch reaches
    block_inputs: list[Tensor] | None = None  # with block_io: each block's input hidden state, detached
    block_output_grads: list[Tensor] | None = None  # with block_io: d total / d (each block's output)


def objective(out, y: Tensor, top_k: int, tc: TrainConfig) -> tuple[Tensor, Tensor]:
    """(cross-entropy, total) from a forward output: lm_loss's formula, in at least fp32 (float64 stays float64)."""
    logits = out.logits.flatten(0, 1)
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y.flatten())
    total = ce
    for r in out.router_logits:
        total = total + router_loss(r, top_k, tc)
    return ce, total


def router_loss(router_logits: Tensor, top_k: int, tc: TrainConfig) -> Tensor:
    """One MoE block's share of the objective: balance_coef * load-balancing loss + z_coef * router z-loss."""
    return tc.balance_coef * load_balancing_loss(router_logits, top_k) + tc.z_coef * router_z_loss(router_logits)


def objective_gradients(model: nn.Module, tokens: Tensor, tc: TrainConfig, values: dict[str, Tensor] | None = None,
                        wrt: list[str] | None = None, block_io: bool = False) -> ObjectiveGradients:
    """Gradient of the objective on tokens (B, T) (inputs tokens[:, :-1], targets tokens[:, 1:]) with respect to
    the parameters named in `wrt` (default all), at the model's weights or at `values` (name -> tensor); with
    block_io, also every block's input and the gradient at its output.

    Leaves on detached views of the weights (torch.func.functional_call): the model's parameters, .grad and
    requires_grad stay as they were, so the model can be shared with other checks.
    """
    names = [n for n, _ in model.named_parameters()]  # tied tensors once (functional_call re-ties them)
    own = dict(model.named_parameters())
    values = {n: (values[n] if values is not None and n in values else own[n]).detach() for n in names}
    wrt = names if wrt is None else wrt
    for n in wrt:
        values[n] = values[n].requires_grad_(True)
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.enable_grad():
        out = functional_call(model, values, (x,), {"return_details": True})
        ce, total = objective(out, y, model.config.top_k, tc)
        outputs = out.hidden_states[1:] if block_io else []
        grads = torch.autograd.grad(total, [values[n] for n in wrt] + outputs, allow_unused=True)
    k = model.config.top_k
    return ObjectiveGradients(
        grads={n: torch.zeros_like(values[n]) if g is None else g for n, g in zip(wrt, grads)},
        ce=ce.item(), total=total.item(),
        expert_tokens=[expert_load(r.detach(), k) for r in out.router_logits],
        input_ids=x.unique(),
        block_inputs=[h.detach() for h in out.hidden_states[:-1]] if block_io else None,
        block_output_grads=list(grads[len(wrt):]) if block_io else None)

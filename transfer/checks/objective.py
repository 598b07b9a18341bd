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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from config import TrainConfig
from models import ModelOutput, expert_load, load_balancing_loss, router_z_loss
from transfer.checks import stream
from transfer.checks.ownership import expected_parameters, lookup


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
    details: ModelOutput | None = None  # with details: the forward's logits, hidden states and router logits


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


def parameter_names(model: nn.Module) -> list[str]:
    """The places the model's architecture has a weight (ownership.expected_parameters), a declared tie once: the
    names the gradients are keyed by, whether the model shares, freezes or buffers some of them or not."""
    names, ties = expected_parameters(model.config)
    tied = {b for _, b in ties}
    return [n for n in names if n not in tied]


def objective_gradients(model: nn.Module, tokens: Tensor, tc: TrainConfig, values: dict[str, Tensor] | None = None,
                        wrt: list[str] | None = None, block_io: bool = False, dtype: torch.dtype | None = None,
                        consume: Callable[[str, Tensor], None] | None = None,
                        details: bool = False) -> ObjectiveGradients:
    """Gradient of the objective on tokens (B, T) (inputs tokens[:, :-1], targets tokens[:, 1:]) with respect to
    the parameters named in `wrt` (default all), at the model's weights or at `values` (name -> tensor); with
    block_io, also every block's input and the gradient at its output.

    Computed in `dtype` (default the model's) on private block copies cast just in time (stream.cast_block), so the
    model stays in its own dtype and nothing of it is modified (.grad, requires_grad, weights). A model whose
    float64 blocks fit stream.REUSE_BYTES is differentiated in one graph; a larger one block by block (a forward
    keeping each block's input, then each block from the last recomputed and pulled by its output's gradient plus
    its own router loss), which holds one block's copy, activations and gradient besides the block inputs. With
    `consume`, each parameter's gradient is handed to consume(name, grad) as soon as it is final and not kept in
    .grads (the checks judge it there and drop it). With details, the forward's outputs are kept too, as
    stream.forward_details would return them on tokens[:, :-1]: the checks that compare the models' outputs read
    them instead of computing the same forward again.
    """
    dt = dtype or lookup(model, "embed.weight").dtype
    names = parameter_names(model)
    wrt = names if wrt is None else list(wrt)
    wanted, values = set(wrt), values or {}
    kept: dict[str, Tensor] = {}

    def give(name: str, grad: Tensor | None, like: Tensor) -> None:
        grad = torch.zeros_like(like) if grad is None else grad
        if consume is None:
            kept[name] = grad
        else:
            consume(name, grad)

    x_ids, y = tokens[:, :-1], tokens[:, 1:]
    run = _one_graph if stream.blocks_fit(model, dt) else _block_by_block
    ce, total, routed, inputs, output_grads, last, logits = run(model, x_ids, y, tc, dt, values, wanted, give, block_io,
                                                                  details)
    out = ModelOutput(logits, inputs + [last.detach()], [r.detach() for r in routed]) if details else None
    return ObjectiveGradients(
        grads={n: kept[n] for n in wrt if n in kept}, ce=ce.item(), total=total.item(),
        expert_tokens=[expert_load(r, model.config.top_k) for r in routed], input_ids=x_ids.unique(),
        block_inputs=inputs if block_io else None, block_output_grads=output_grads if block_io else None,
        details=out)


def _head_ce(model: nn.Module, h: Tensor, y: Tensor, dt: torch.dtype, norm_leaf: Tensor,
             head_leaf: Tensor) -> tuple[Tensor, Tensor]:
    """(cross-entropy as objective() takes it, logits) of the final norm and LM head on the last hidden state h."""
    logits = F.linear(functional_call(stream.final_norm(model, dt), {"weight": norm_leaf}, (h,)), head_leaf)
    ce = F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)), y.flatten())
    return ce, logits


def _edge_leaves(model, values, dt, wanted, which=("embed.weight", "norm.weight", "lm_head.weight")):
    """The weights outside the blocks named in `which`, in dt, as leaves that require grad where wanted; a tied LM
    head is the embedding's leaf."""
    leaves = {n: _value(model, values, n, dt).requires_grad_(n in wanted) for n in which if n != "lm_head.weight"}
    if "lm_head.weight" in which:
        tied = "lm_head.weight" not in parameter_names(model)
        source = "embed.weight" if tied else "lm_head.weight"
        leaves["lm_head.weight"] = leaves.get(source)
        if leaves["lm_head.weight"] is None:
            leaves["lm_head.weight"] = _value(model, values, source, dt).requires_grad_(source in wanted)
    return leaves


def _one_graph(model, x_ids, y, tc, dt, values, wanted, give, block_io, details):
    """The whole model in one autograd graph (a model whose float64 blocks fit stream.REUSE_BYTES): each block
    cast once, its activations kept through backward, one backward pass."""
    k, names = model.config.top_k, parameter_names(model)
    edges = _edge_leaves(model, values, dt, wanted)
    norm_leaf, head_leaf = edges["norm.weight"], edges["lm_head.weight"]
    leaves = {n: t for n, t in edges.items() if n in wanted}
    cos, sin = stream.rope(model, x_ids.shape[1], dt)
    inputs, outputs, routed, block_leaves = [], [], [], {}
    with torch.enable_grad():
        x = F.embedding(x_ids, edges["embed.weight"])
        for j in range(len(model.blocks)):
            prefix = f"blocks.{j}."
            block, local = stream.cast_block(model, j, dt), _block_values(values, j, dt)
            for n in names:
                if n.startswith(prefix) and n in wanted:
                    short = n[len(prefix):]
                    weight = local[short] if short in local else block.get_parameter(short)
                    local[short] = block_leaves[n] = weight.detach().requires_grad_(True)
            inputs.append(x.detach())
            x, r = functional_call(block, local, (x, cos, sin))
            outputs.append(x)
            if r is not None:
                routed.append(r)
        ce, logits = _head_ce(model, x, y, dt, norm_leaf, head_leaf)
        total = ce
        for r in routed:
            total = total + router_loss(r, k, tc)
        order = [n for n in names if n in leaves or n in block_leaves]
        tensors = [leaves[n] if n in leaves else block_leaves[n] for n in order]
        grads = torch.autograd.grad(total, tensors + (outputs if block_io else []), allow_unused=True)
    for n, t, g in zip(order, tensors, grads):
        give(n, g, t)
    return (ce.detach(), total.detach(), [r.detach() for r in routed], inputs, list(grads[len(order):]), x.detach(),
            logits.detach() if details else None)


def _block_by_block(model, x_ids, y, tc, dt, values, wanted, give, block_io, details):
    """One block at a time: a forward keeping each block's input, the head's gradient, then each block from the
    last, recomputed from its input and pulled by its output's gradient plus its own router loss. The embedding and
    LM head are cast to dt only while their own gradient is taken (the forward gathers the embedding's rows)."""
    k, names = model.config.top_k, parameter_names(model)
    tied = "lm_head.weight" not in names
    cos, sin = stream.rope(model, x_ids.shape[1], dt)
    inputs, routed = [], []
    with torch.no_grad():
        table = values["embed.weight"] if "embed.weight" in values else lookup(model, "embed.weight")
        x = table.detach()[x_ids].to(dt)  # the rows F.embedding would read from the cast table, cast alone
        for j in range(len(model.blocks)):
            inputs.append(x)
            x, r = functional_call(stream.cast_block(model, j, dt), _block_values(values, j, dt), (x, cos, sin))
            if r is not None:
                routed.append(r)
    head = ("norm.weight", "lm_head.weight") + (("embed.weight",) if tied else ())
    edges = _edge_leaves(model, values, dt, wanted, head)
    with torch.enable_grad():
        h = x.requires_grad_(True)
        ce, logits = _head_ce(model, h, y, dt, edges["norm.weight"], edges["lm_head.weight"])
        differentiated = [n for n in head if n in wanted and (n != "lm_head.weight" or not tied)]
        grads = torch.autograd.grad(ce, [h] + [edges[n] for n in differentiated])
    g_out, head_grads = grads[0], dict(zip(differentiated, grads[1:]))
    del grads
    logits = logits.detach() if details else None  # (B, T, V): kept through the blocks' backward only if asked
    for n in ("norm.weight", "lm_head.weight"):
        if n in head_grads:
            give(n, head_grads.pop(n), edges[n])
    embed_leaf = edges.get("embed.weight")  # tied: the head's leaf, kept for the embedding's own share
    del edges
    total = ce.detach()
    for r in routed:  # in block order, as objective() adds them
        total = total + router_loss(r, k, tc)
    output_grads: list[Tensor] = [None] * len(inputs)
    for j in reversed(range(len(inputs))):
        prefix = f"blocks.{j}."
        local = [n for n in names if n.startswith(prefix) and n in wanted]
        output_grads[j] = g_out
        block = stream.cast_block(model, j, dt)
        need_input = j > 0 or "embed.weight" in wanted
        g_params, g_out, _ = block_backward(block, _block_values(values, j, dt), [n[len(prefix):] for n in local],
                                            inputs[j], output_grads[j], cos, sin, k, tc, need_input)
        for n in local:
            give(n, g_params[n[len(prefix):]], block.get_parameter(n[len(prefix):]))
        del block
    if "embed.weight" in wanted:
        if embed_leaf is None:
            embed_leaf = _value(model, values, "embed.weight", dt).requires_grad_(True)
        with torch.enable_grad():
            (g_embed,) = torch.autograd.grad(F.embedding(x_ids, embed_leaf), embed_leaf, g_out)
        if "embed.weight" in head_grads:
            g_embed = head_grads.pop("embed.weight") + g_embed
        give("embed.weight", g_embed, embed_leaf)
    return ce, total, routed, inputs, output_grads, x, logits


def _value(model: nn.Module, values: dict[str, Tensor], name: str, dt: torch.dtype) -> Tensor:
    return (values[name] if name in values else lookup(model, name)).detach().to(dt)


def _block_values(values: dict[str, Tensor], j: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """The overrides in `values` for block j, keyed as in the block, in `dtype`."""
    prefix = f"blocks.{j}."
    return {n[len(prefix):]: v.detach().to(dtype) for n, v in values.items() if n.startswith(prefix)}


def block_backward(block: nn.Module, local: dict[str, Tensor], wrt: list[str], x: Tensor, output_grad: Tensor,
                   cos: Tensor, sin: Tensor, top_k: int, tc: TrainConfig,
                   input_grad: bool = True) -> tuple[dict[str, Tensor | None], Tensor | None, Tensor | None]:
    """One block's share of the objective's gradient: (gradients of the block-local names in `wrt`, the gradient
    at its input x (None unless input_grad), its router logits) for the block at its weights with `local`
    overrides, pulled by output_grad (d objective / d its output) plus its own router loss."""
    local = dict(local)
    for n in wrt:
        local[n] = (local[n] if n in local else block.get_parameter(n)).detach().requires_grad_(True)
    x = x.detach().requires_grad_(input_grad)
    with torch.enable_grad():
        y, logits = functional_call(block, local, (x, cos, sin))
        loss = (y * output_grad).sum()
        if logits is not None:
            loss = loss + router_loss(logits, top_k, tc)
        leaves = [local[n] for n in wrt] + ([x] if input_grad else [])
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else []
    return dict(zip(wrt, grads)), (grads[-1] if input_grad else None), logits

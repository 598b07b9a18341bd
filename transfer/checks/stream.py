"""A model evaluated in a compute dtype one block at a time, while it stays in its own dtype (fp32, bf16) and on
its own device: the checks cast each block to float64 just before they use it and drop it after, so they never
hold a float64 copy of a whole model (a 1.5 B-parameter grown model would need 12 GB for one).

    out = forward_details(model, tokens, torch.float64)   # model(tokens, return_details=True), in float64
    block = cast_block(model, j, torch.float64)           # a private float64 copy of block j
    w = cast_weight(model, "lm_head.weight", torch.float64)

A copy of one block owns every tensor (ownership.own_block_tensors), so a block that reuses another's parameter
objects, a frozen weight or a weight held as a buffer evaluate like any other; the caller's model is judged for
those on its own (ownership.measure_ownership). The result equals the whole model's float64 copy's exactly: the
same operations on the same float64 values, in the same order.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch import Tensor, nn

from models import ModelOutput
from transfer.checks.ownership import lookup, own_block_tensors


# Within reuse_blocks(), a model's block copies are kept for the next check that reads the same block when all of
# them fit this budget (the first model first): such a model is cast once per check run, as the whole copies were;
# a larger one is cast block by block at each use and holds one block at a time.
REUSE_BYTES = 2 << 30
_reuse: dict | None = None  # the active reuse_blocks() scope: {"left": bytes, "blocks": {(id, j, dtype): block}}


@contextlib.contextmanager
def reuse_blocks(budget: int | None = None):
    """Keep the block copies cast_block makes, up to `budget` bytes (default REUSE_BYTES), until the scope ends
    (one check run)."""
    global _reuse
    outer, _reuse = _reuse, {"left": REUSE_BYTES if budget is None else budget, "blocks": {}}
    try:
        yield
    finally:
        _reuse = outer


def blocks_fit(model: nn.Module, dtype: torch.dtype, budget: int | None = None) -> bool:
    """Whether every block of `model` in `dtype` takes at most `budget` bytes (default REUSE_BYTES): a model the
    checks may hold whole."""
    size = torch.finfo(dtype).bits // 8
    return size * sum(p.numel() for p in model.blocks.parameters()) <= (REUSE_BYTES if budget is None else budget)


def reusing_blocks(fn):
    """fn run within reuse_blocks(): a check entry point whose parts read the same blocks several times."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with reuse_blocks():
            return fn(*args, **kwargs)
    return run


def cast_block(model: nn.Module, j: int, dtype: torch.dtype) -> nn.Module:
    """A private copy of model.blocks[j] in `dtype`, eval mode, every place its own Parameter, no .grad (within
    reuse_blocks, the copy an earlier call made: callers never modify it)."""
    key = (id(model), j, dtype)
    if _reuse is not None and key in _reuse["blocks"]:
        return _reuse["blocks"][key]
    block = own_block_tensors(copy.deepcopy(model.blocks[j]), model.config).to(dtype)
    for p in block.parameters():
        p.grad = None
    block.eval()
    if _reuse is not None and _kept(model, dtype):
        _reuse["blocks"][key] = block
    return block


def _kept(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the active scope keeps `model`'s blocks in dtype: all of them, decided at its first block (their
    bytes reserved then), or none: a model whose blocks are cast on every use gains little from a few kept."""
    decided = _reuse.setdefault("models", {})
    key = (id(model), dtype)
    if key not in decided:
        size = torch.finfo(dtype).bits // 8 * sum(p.numel() for p in model.blocks.parameters())
        decided[key] = size <= _reuse["left"]
        if decided[key]:
            _reuse["left"] -= size
    return decided[key]


def cast_weight(model: nn.Module, name: str, dtype: torch.dtype, copy: bool = False) -> Tensor:
    """The tensor at a dotted name (parameter, buffer or plain attribute), detached, in `dtype` (with copy, never
    the model's own storage, even in its own dtype)."""
    t = lookup(model, name)
    if t is None:
        raise KeyError(f"the model has no weight {name}")
    return t.detach().to(dtype, copy=copy)


def cast_weight_rows(model: nn.Module, name: str, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows of the tensor at a dotted name, gathered first and then cast (the whole table never is)."""
    return lookup(model, name).detach()[rows].to(dtype)


def rope(model: nn.Module, T: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The model's RoPE cos and sin tables for T positions, in `dtype`."""
    return model.rope_cos[:T].to(dtype), model.rope_sin[:T].to(dtype)


def embed_rows(model: nn.Module, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """The embedding of token ids (B, T) in `dtype`: rows gathered first, so the table is never cast whole."""
    return cast_weight_rows(model, "embed.weight", ids, dtype)


def final_norm(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A private copy of the final norm in `dtype`."""
    return copy.deepcopy(model.norm).to(dtype)


@torch.no_grad()
def forward_details(model: nn.Module, tokens: Tensor, dtype: torch.dtype) -> ModelOutput:
    """model(tokens, return_details=True) computed in `dtype`, one block cast at a time (Transformer.forward's
    steps: embedding, blocks, final norm, LM head)."""
    T = tokens.shape[1]
    if T > model.config.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds max_seq_len={model.config.max_seq_len}")
    x = embed_rows(model, tokens, dtype)
    cos, sin = rope(model, T, dtype)
    hidden, router_logits = [x], []
    for j in range(len(model.blocks)):
        x, logits = cast_block(model, j, dtype)(x, cos, sin)
        hidden.append(x)
        if logits is not None:
            router_logits.append(logits)
    logits = torch.nn.functional.linear(final_norm(model, dtype)(x), cast_weight(model, "lm_head.weight", dtype))
    return ModelOutput(logits, hidden, router_logits)


def join_outputs(first: ModelOutput | None, rest: ModelOutput | None) -> ModelOutput:
    """Two forward_details outputs on consecutive rows of one batch as the batch's (either may be None)."""
    if first is None or rest is None:
        return first if rest is None else rest
    return ModelOutput(torch.cat([first.logits, rest.logits]),
                       [torch.cat(pair) for pair in zip(first.hidden_states, rest.hidden_states)],
                       [torch.cat(pair) for pair in zip(first.router_logits, rest.router_logits)])

"""The (old, new) pair every comparing check works on: float64 copies made once, the width factor, the block
layout, and the forward passes the checks share. Building one validates the pair once for all checks."""
from __future__ import annotations

import copy
from dataclasses import fields

import torch
from torch import Tensor, nn

from transfer.checks.clones import positional, residual_map, tiling_index
from transfer.checks.ownership import measure_ownership, own_tensors
from transfer.checks.results import FIX_PAIR, CheckResult
from transfer.simple_growth import layer_sources

# ModelConfig fields that growth changes on purpose (width, heads, depth, experts, tying); any other field that
# differs between old and new is a change growth must not make (norm_eps, rope_theta, ...).
GROWN_FIELDS = frozenset({"dim", "n_heads", "n_kv_heads", "ffn_dim", "n_layers", "n_experts", "top_k",
                          "tie_embeddings", "max_seq_len"})


def require_tokens(tokens: Tensor, min_len: int = 2, why: str = "") -> None:
    """ValueError unless tokens is a LongTensor (batch, seq_len) with at least min_len positions."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a LongTensor (batch, seq_len); got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.shape[1] < min_len:
        raise ValueError(f"tokens have {tokens.shape[1]} positions; need at least {min_len}" + (f" ({why})" if why else ""))


def pair_problem(oc, nc) -> str | None:
    """Why the two configs cannot be a grown pair at all, or None."""
    if nc.dim % oc.dim:
        return f"new dim {nc.dim} is not an integer multiple of old dim {oc.dim}"
    if nc.n_layers < oc.n_layers:
        return f"new model has fewer layers ({nc.n_layers}) than the old one ({oc.n_layers})"
    if nc.vocab_size != oc.vocab_size:
        return f"vocabulary changed from {oc.vocab_size} to {nc.vocab_size}"
    if nc.max_seq_len < oc.max_seq_len:
        return f"context shrank: max_seq_len {oc.max_seq_len} -> {nc.max_seq_len}"
    return None


def rejected_pair(name: str, old: nn.Module, new: nn.Module) -> CheckResult | None:
    """The one place a pair is rejected: a failed result named `name`, or None when the pair is valid."""
    problem = pair_problem(old.config, new.config)
    if problem is None:
        return None
    return CheckResult(name, False, f"not a grown pair: {problem}. Fix: {FIX_PAIR}.", {"problem": problem}, FIX_PAIR,
                       quantity="old and new configs form a grown pair")  # a yes/no: no figure, no limit


def config_changes(oc, nc) -> list[str]:
    """Config fields growth must keep but did not, e.g. ["norm_eps 1e-05 -> 1e-06"]."""
    return [f"{f.name} {getattr(oc, f.name)!r} -> {getattr(nc, f.name)!r}" for f in fields(oc)
            if f.name not in GROWN_FIELDS and getattr(oc, f.name) != getattr(nc, f.name)]


def copy_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A detached copy in `dtype` and eval mode, without .grad, every place owning its own Parameter
    (ownership.own_tensors: shared or frozen weights are judged on the caller's model, measure_ownership)."""
    clone = own_tensors(copy.deepcopy(model)).to(dtype)
    for p in clone.parameters():
        p.grad = None
    return clone.eval()


def relative_drift(new: Tensor, ref: Tensor) -> float:
    """max |new - ref| / RMS(ref): scale-free, and the max catches a single broken unit."""
    return ((new - ref).abs().max() / ref.pow(2).mean().sqrt().clamp(min=1e-300)).item()


class ModelPair:
    """Copies of a grown pair in `dtype`, what the checks share: width factor s, layout, tokens, forward outputs.

    Build it only for a valid pair (rejected_pair first). The copies are shared read-only: a check computes
    gradients with torch.autograd.grad on detached views (transfer.checks.objective), never through .grad or
    requires_grad, so no check leaves anything behind for the next one.
    """

    def __init__(self, old: nn.Module, new: nn.Module, tokens: Tensor | None, dtype: torch.dtype,
                 layout: list[tuple[int, bool]] | None = None):
        self.oc, self.nc = old.config, new.config
        if tokens is not None and tokens.shape[1] > self.oc.max_seq_len:
            raise ValueError(f"tokens have {tokens.shape[1]} positions; the old model's max_seq_len is "
                             f"{self.oc.max_seq_len}: pass at most that many")
        assert pair_problem(self.oc, self.nc) is None, "reject an invalid pair with rejected_pair first"
        self.ownership = measure_ownership(new)  # on the caller's model: the copies own every tensor
        self.old, self.new = copy_model(old, dtype), copy_model(new, dtype)
        self.tokens = None if tokens is None else tokens.to(next(self.new.parameters()).device)
        self.s = self.nc.dim // self.oc.dim
        self.layout = layout or layer_sources(self.oc.n_layers, self.nc.n_layers - self.oc.n_layers)
        # Which new residual dimensions copy which old one: the project tiles, other tools may interleave.
        found = residual_map(self.old.embed.weight, self.new.embed.weight, self.s)
        self.residual_found = found is not None
        self.residual = found if found is not None else positional(self.s, self.oc.dim)
        self._index = tiling_index(self.residual).to(self.new.embed.weight.device)
        self._tiled = torch.equal(self.residual, positional(self.s, self.oc.dim))
        self.config_changes = config_changes(self.oc, self.nc)
        self._outputs = None

    def outputs(self):
        """(old, new) forward outputs with per-layer hidden states and router logits, computed once."""
        if self._outputs is None:
            with torch.no_grad():
                self._outputs = (self.old(self.tokens, return_details=True), self.new(self.tokens, return_details=True))
        return self._outputs

    def tile(self, x: Tensor) -> Tensor:
        """[x; x; ...] along the last dimension (in the new model's residual layout): the grown model's view of an
        old hidden vector."""
        return x.repeat(*([1] * (x.dim() - 1)), self.s) if self._tiled else x[..., self._index]

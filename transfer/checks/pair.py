"""The (old, new) pair every comparing check works on: the width factor, the block layout, the forward passes the
checks share, and each block in float64 on demand (never a float64 copy of a whole model). Building one validates
the pair once for all checks."""
from __future__ import annotations

import copy
from dataclasses import fields

import torch
from torch import Tensor, nn

from models import ModelOutput
from transfer.checks.clones import positional, residual_map, tiling_index
from transfer.checks import stream
from transfer.checks.ownership import lookup, measure_ownership, own_tensors
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
    # norms instead of abs().max() and pow(2).mean(): the same figures without two temporaries of the tensor's size
    worst = torch.linalg.vector_norm(new - ref, ord=float("inf"))
    rms = torch.linalg.vector_norm(ref) / ref.numel() ** 0.5
    return (worst / rms.clamp(min=1e-300)).item()


class ModelPair:
    """A grown pair as the checks see it: width factor s, layout, tokens, forward outputs, and each block in the
    checks' dtype on demand.

    The models stay as they are (dtype, device, mode, .grad): a check reads a block through block(), a private
    copy cast just in time (transfer.checks.stream), so the pair never holds a float64 copy of a whole model;
    gradients are taken with torch.autograd.grad on such copies (transfer.checks.objective). `old` and `new` are
    whole copies in `dtype`, made on first use, for callers that want one (the checks do not).
    Build it only for a valid pair (rejected_pair first).
    """

    def __init__(self, old: nn.Module, new: nn.Module, tokens: Tensor | None, dtype: torch.dtype,
                 layout: list[tuple[int, bool]] | None = None):
        self.oc, self.nc = old.config, new.config
        if tokens is not None and tokens.shape[1] > self.oc.max_seq_len:
            raise ValueError(f"tokens have {tokens.shape[1]} positions; the old model's max_seq_len is "
                             f"{self.oc.max_seq_len}: pass at most that many")
        assert pair_problem(self.oc, self.nc) is None, "reject an invalid pair with rejected_pair first"
        self.ownership = measure_ownership(new)  # on the caller's model: the block copies own every tensor
        self.models, self.dtype = {"old": old, "new": new}, dtype
        device = lookup(new, "embed.weight").device
        self.tokens = None if tokens is None else tokens.to(device)
        self.s = self.nc.dim // self.oc.dim
        self.layout = layout or layer_sources(self.oc.n_layers, self.nc.n_layers - self.oc.n_layers)
        # Which new residual dimensions copy which old one: the project tiles, other tools may interleave.
        found = residual_map(lookup(old, "embed.weight").detach(), lookup(new, "embed.weight").detach(), self.s)
        self.residual_found = found is not None
        self.residual = found if found is not None else positional(self.s, self.oc.dim)
        self._index = tiling_index(self.residual).to(device)
        self._tiled = torch.equal(self.residual, positional(self.s, self.oc.dim))
        self.config_changes = config_changes(self.oc, self.nc)
        self._outputs = None
        self._known_new: ModelOutput | None = None  # the new model's outputs on the first rows, computed elsewhere
        self._copies: dict[str, nn.Module] = {}

    @property
    def old(self) -> nn.Module:
        """A whole copy of the old model in the pair's dtype, made on first use (the checks stream blocks)."""
        return self._copy("old")

    @property
    def new(self) -> nn.Module:
        """A whole copy of the new model in the pair's dtype, made on first use (the checks stream blocks)."""
        return self._copy("new")

    def _copy(self, which: str) -> nn.Module:
        if which not in self._copies:
            self._copies[which] = copy_model(self.models[which], self.dtype)
        return self._copies[which]

    def block(self, which: str, j: int) -> nn.Module:
        """Block j of the "old" or "new" model, a private copy in the pair's dtype."""
        return stream.cast_block(self.models[which], j, self.dtype)

    def rope(self, which: str, n: int | None = None) -> tuple[Tensor, Tensor]:
        """The "old" or "new" model's RoPE cos and sin tables (first n positions; default all), in the pair's dtype."""
        model = self.models[which]
        return stream.rope(model, n or model.rope_cos.shape[0], self.dtype)

    def outputs(self) -> tuple[ModelOutput, ModelOutput]:
        """(old, new) forward outputs with per-layer hidden states and router logits, computed once, block by block
        (the new model's first rows taken from share_new where given)."""
        if self._outputs is None:
            old = stream.forward_details(self.models["old"], self.tokens, self.dtype)
            known, self._known_new = self._known_new, None
            n = 0 if known is None else known.logits.shape[0]
            rest = stream.forward_details(self.models["new"], self.tokens[n:], self.dtype) if n < len(self.tokens) else None
            self._outputs = old, stream.join_outputs(known, rest)
        return self._outputs

    def share_new(self, known: ModelOutput) -> None:
        """The new model's outputs on the first rows of the pair's tokens, in the pair's dtype, from a forward the
        caller made anyway (the objective's gradient, objective_gradients(..., details=True)): outputs() computes
        only the other rows."""
        assert self._outputs is None and known.logits.shape[1] == self.tokens.shape[1], "rows of the pair's tokens"
        self._known_new = known

    def embedding_drift(self, rows: int = 4096) -> float:
        """relative_drift of the new embedding table against the old one tiled, over every row (ids the batch
        lacks included), a slab of rows at a time in the pair's dtype."""
        old, new = (lookup(self.models[w], "embed.weight").detach() for w in ("old", "new"))
        worst, squares = 0.0, 0.0
        for i in range(0, old.shape[0], rows):
            ref = self.tile(old[i:i + rows].to(self.dtype))
            worst = max(worst, (new[i:i + rows].to(self.dtype) - ref).abs().max().item())
            squares += ref.pow(2).sum().item()
        rms = (squares / (old.shape[0] * self.nc.dim)) ** 0.5
        return worst / max(rms, 1e-300)

    def tile(self, x: Tensor) -> Tensor:
        """[x; x; ...] along the last dimension (in the new model's residual layout): the grown model's view of an
        old hidden vector."""
        return x.repeat(*([1] * (x.dim() - 1)), self.s) if self._tiled else x[..., self._index]

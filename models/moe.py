"""Mixture-of-experts FFN: softmax router -> top-k -> renormalise (Mixtral), dropless, grouped by expert.

With identical experts the output equals the dense FFN's exactly, because the kept weights sum to 1.
The training losses (Switch balance loss, router z-loss) are computed from the router logits the layer
returns, outside the layer, as Mixtral does.

The experts run on the expert-sorted tokens in one of three ways (`MoEFeedForward.impl`, set_expert_impl):
    loop        a Python loop over experts split by host-side counts: the reference, exact in float64; it reads
                the counts on the host (a device sync on CUDA) and runs eagerly inside torch.compile
    grouped_mm  torch's grouped matmuls on device-side int32 offsets: no sync, one graph under compile; bf16 on
                CUDA (SM80+) and, from torch 2.11, on CPU (fp32 too in eager)
    loop_op     the loop inside one custom operator of static output shape: compile sees one node (no graph
                break, no recompiles) where grouped_mm is not available
    auto        float64 -> loop; grouped_mm where it runs for the device and dtype; else loop_op under compile
                and loop in eager (the faster eager path on CPU: see EAGER_CPU_IMPL)
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ExpertImpl = Literal["auto", "loop", "grouped_mm", "loop_op"]
EXPERT_IMPLS: tuple[str, ...] = ("auto", "loop", "grouped_mm", "loop_op")
# Eager default on CPU where grouped_mm runs (torch >= 2.11), by dtype; measured with bench/expert_impls.py
# (BENCHMARKS.md, "MoE dispatch"): forward + backward of the cpu/cuda presets' MoE layers.
EAGER_CPU_IMPL: dict[torch.dtype, str] = {torch.bfloat16: "grouped_mm", torch.float32: "loop"}
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # public from torch 2.10


def route(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Combine weights (N, k), renormalised to sum to 1, and chosen expert ids (N, k)."""
    probs = _at_least_fp32(router_logits).softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def tokens_per_expert(expert_ids: Tensor, n_experts: int) -> Tensor:
    """(E,) int64 count of each id in expert_ids: a fixed-size scatter-add on the device (bincount's output size
    depends on the data, which breaks a compiled graph and reads the maximum back to the host)."""
    flat = expert_ids.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def expert_load(router_logits: Tensor, top_k: int) -> Tensor:
    """Tokens routed to each expert, (E,) int64."""
    _, experts = route(router_logits, top_k)
    return tokens_per_expert(experts, router_logits.shape[-1])


def load_balancing_loss(router_logits: Tensor, top_k: int) -> Tensor:
    """Switch balance loss E * sum_i f_i * P_i, normalised so perfect balance reads 1.0 (Megatron's scale)."""
    n_experts = router_logits.shape[-1]
    probs = _at_least_fp32(router_logits).softmax(dim=-1)
    frac_assigned = expert_load(router_logits, top_k).to(probs.dtype) / (router_logits.shape[0] * top_k)
    return n_experts * (frac_assigned * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """mean(logsumexp(logits)^2): keeps router logits small (ST-MoE)."""
    return _at_least_fp32(router_logits).logsumexp(dim=-1).square().mean()


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def load_entropy(counts: Tensor) -> float:
    """Entropy of the per-expert load divided by ln(E): 1.0 is perfectly balanced, 0 all on one expert."""
    p = counts.double() / counts.sum().clamp(min=1)
    h = -(p * p.clamp(min=1e-300).log()).sum().item()
    return h / math.log(len(counts)) if len(counts) > 1 else 1.0


class MoEFeedForward(nn.Module):
    """n_experts SwiGLU experts stored as stacked tensors; tokens are sorted by expert, one matmul group each."""

    def __init__(self, dim: int, ffn_dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.impl: ExpertImpl = "auto"  # a training choice, not architecture: checkpoints never see it
        self.router = nn.Linear(dim, n_experts, bias=False)
        # (E, out, in) like nn.Linear weights, so every expert is an ordinary SwiGLU.
        self.gate_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))
        _probe_cpu_grouped_mm()  # here, eagerly, so that forward (perhaps under compile) reads a plain bool

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> output (B, T, D) and router logits (B*T, E)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        router_logits = self.router(x)  # (N, E)
        weights, experts = route(router_logits, self.top_k)  # (N, k)
        flat_experts = experts.flatten()  # (N*k,)
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k  # token index of each sorted assignment
        counts = tokens_per_expert(flat_experts, self.n_experts)  # (E,) on the device
        y_sorted = EXPERT_FNS[self.resolved_impl(x)](x[token_of], counts, self.gate_proj, self.up_proj,
                                                     self.down_proj)
        y_sorted = y_sorted * weights.flatten()[order].unsqueeze(-1).to(y_sorted.dtype)
        y = y_sorted.new_zeros(x.shape[0], y_sorted.shape[1]).index_add_(0, token_of, y_sorted)  # (N, D)
        return y.reshape(shape), router_logits

    def resolved_impl(self, x: Tensor) -> str:
        """The expert path `impl` names for this input (auto: see the module docstring)."""
        if self.impl != "auto":
            return self.impl
        dtype = _compute_dtype(x, self.gate_proj)
        if dtype == torch.float64:
            return "loop"
        compiling = torch.compiler.is_compiling()
        if grouped_mm_runs(x.device, dtype, compiling):
            return "grouped_mm" if compiling or x.device.type != "cpu" else EAGER_CPU_IMPL.get(dtype, "loop")
        return "loop_op" if compiling else "loop"


def set_expert_impl(model: nn.Module, impl: ExpertImpl) -> nn.Module:
    """Choose the expert path of every MoE layer in model (as transformers' set_experts_implementation)."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert impl {impl!r} must be one of {', '.join(EXPERT_IMPLS)}")
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            m.impl = impl
    return model


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: autocast's where it is on, else the weights' and input's."""
    if torch.is_autocast_enabled(x.device.type) and weight.dtype.is_floating_point and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def grouped_mm_runs(device: torch.device, dtype: torch.dtype, compiling: bool = False) -> bool:
    """Whether torch's grouped matmul runs for this device and dtype (compiled: bf16 only, its meta's rule)."""
    if _GROUPED_MM is None or dtype not in (torch.bfloat16, torch.float32) or (compiling and dtype != torch.bfloat16):
        return False
    if device.type == "cuda":  # bf16 kernels: SM90 on torch 2.8, SM80+ from 2.9 (fast CUTLASS path SM90+)
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    if not compiling:
        _probe_cpu_grouped_mm()
    return device.type == "cpu" and bool(_CPU_GROUPED_MM)


_CPU_GROUPED_MM: bool | None = None  # set by _probe_cpu_grouped_mm when the first MoE layer is built


def _probe_cpu_grouped_mm() -> None:
    """torch >= 2.11 on CPU: older CPU kernels are missing (<= 2.8) or need 16-byte-aligned operands (<= 2.10)."""
    global _CPU_GROUPED_MM
    if _CPU_GROUPED_MM is not None:
        return
    _CPU_GROUPED_MM = False
    if _GROUPED_MM is None or tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11):
        return
    try:
        a, b = torch.ones(4, 8, dtype=torch.bfloat16), torch.ones(2, 8, 8, dtype=torch.bfloat16)
        _GROUPED_MM(a, b, offs=torch.tensor([1, 4], dtype=torch.int32))
        _CPU_GROUPED_MM = True
    except (RuntimeError, NotImplementedError):
        pass


# Eager even inside torch.compile: the split sizes change every step, so a traced loop would recompile (or run
# as many small dynamic-shape graphs) each step; measured on CPU, compiled 1.5x slower than eager at micro size.
@torch.compiler.disable
def _loop_experts(x_sorted: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """SwiGLU of each expert over its contiguous segment of the expert-sorted tokens, (N*k, D)."""
    # unbind once: indexing the stacked weights per expert would make backward write a full-size zero
    # gradient for every expert (E^2 memory traffic, most of the layer's time at 16 experts).
    gates, ups, downs = gate.unbind(0), up.unbind(0), down.unbind(0)
    outs = []
    for e, segment in enumerate(x_sorted.split(counts.tolist())):  # tolist: the host sync this path pays
        if segment.shape[0]:
            h = F.silu(segment @ gates[e].t()) * (segment @ ups[e].t())
            outs.append(h @ downs[e].t())
    return torch.cat(outs) if outs else x_sorted.new_zeros(x_sorted.shape)


def _grouped_experts(x_sorted: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """The same SwiGLUs as three grouped matmuls over int32 offsets computed on the device, (N*k, D)."""
    offs = counts.cumsum(0).to(torch.int32)  # end of each expert's segment
    dtype = _compute_dtype(x_sorted, gate)  # grouped_mm ignores autocast: cast here, once per weight
    x_sorted = x_sorted.to(dtype)
    g, u, d = (w.to(dtype).transpose(-2, -1) for w in (gate, up, down))  # (E, in, out) views
    h = F.silu(_GROUPED_MM(x_sorted, g, offs=offs)) * _GROUPED_MM(x_sorted, u, offs=offs)  # (N*k, F)
    return _GROUPED_MM(h, d, offs=offs)


def _op_experts(x_sorted: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """The loop as one custom operator (explicit casts: autocast does not reach inside it), (N*k, D)."""
    dtype = _compute_dtype(x_sorted, gate)
    return torch.ops.growth.moe_experts(x_sorted.to(dtype), counts, *(w.to(dtype) for w in (gate, up, down)))[0]


@torch.library.custom_op("growth::moe_experts", mutates_args=())
def _moe_experts(x: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(y (S, D), a = x g^T (S, F), b = x u^T (S, F)); a and b are kept for backward instead of recomputed."""
    a, b = x.new_empty(x.shape[0], gate.shape[1]), x.new_empty(x.shape[0], gate.shape[1])
    y = x.new_empty(x.shape[0], down.shape[1])
    for e, (lo, hi) in enumerate(_segments(counts)):
        torch.mm(x[lo:hi], gate[e].t(), out=a[lo:hi])
        torch.mm(x[lo:hi], up[e].t(), out=b[lo:hi])
        torch.mm(F.silu(a[lo:hi]) * b[lo:hi], down[e].t(), out=y[lo:hi])
    return y, a, b


@_moe_experts.register_fake
def _(x, counts, gate, up, down):
    return x.new_empty(x.shape[0], down.shape[1]), x.new_empty(x.shape[0], gate.shape[1]), x.new_empty(
        x.shape[0], gate.shape[1])


@torch.library.custom_op("growth::moe_experts_backward", mutates_args=())
def _moe_experts_backward(dy: Tensor, x: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor, a: Tensor,
                          b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, gate, up, down for y = (silu(a) * b) down^T, a = x gate^T, b = x up^T, per expert."""
    dx, dg, du, dd = torch.empty_like(x), torch.zeros_like(gate), torch.zeros_like(up), torch.zeros_like(down)
    for e, (lo, hi) in enumerate(_segments(counts)):
        ae, be, dye = a[lo:hi], b[lo:hi], dy[lo:hi]
        s = torch.sigmoid(ae)
        silu = ae * s
        torch.mm(dye.t(), silu * be, out=dd[e])
        dh = dye @ down[e]  # (n, F)
        db = dh * silu
        da = dh * be * s * (1 + ae * (1 - s))  # silu'(a) = s (1 + a (1 - s))
        torch.mm(da.t(), x[lo:hi], out=dg[e])
        torch.mm(db.t(), x[lo:hi], out=du[e])
        torch.mm(da, gate[e], out=dx[lo:hi]).addmm_(db, up[e])
    return dx, dg, du, dd


@_moe_experts_backward.register_fake
def _(dy, x, counts, gate, up, down, a, b):
    return torch.empty_like(x), torch.empty_like(gate), torch.empty_like(up), torch.empty_like(down)


def _segments(counts: Tensor) -> list[tuple[int, int]]:
    """(start, end) of each expert's rows; inside the custom ops the host read is the operator's own affair."""
    ends = counts.cumsum(0).tolist()
    return [(lo, hi) for lo, hi in zip([0] + ends[:-1], ends)]


def _setup_context(ctx, inputs, output) -> None:
    x, counts, gate, up, down = inputs
    _, a, b = output
    ctx.save_for_backward(x, counts, gate, up, down, a, b)


def _backward(ctx, dy: Tensor, _da, _db):
    x, counts, gate, up, down, a, b = ctx.saved_tensors
    dx, dg, du, dd = torch.ops.growth.moe_experts_backward(dy.contiguous(), x, counts, gate, up, down, a, b)
    return dx, None, dg, du, dd


_moe_experts.register_autograd(_backward, setup_context=_setup_context)

EXPERT_FNS = {"loop": _loop_experts, "grouped_mm": _grouped_experts, "loop_op": _op_experts}

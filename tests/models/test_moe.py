import math

import torch
import torch.nn.functional as F

from models import MoEFeedForward, expert_load, load_balancing_loss, load_entropy, route, router_z_loss


def naive_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Slow obvious reference: every token, every chosen expert, one at a time."""
    flat = x.reshape(-1, x.shape[-1])
    weights, experts = route(moe.router(flat), moe.top_k)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for w, e in zip(weights[t], experts[t]):
            h = F.silu(moe.gate_proj[e] @ flat[t]) * (moe.up_proj[e] @ flat[t])
            out[t] += w * (moe.down_proj[e] @ h)
    return out.reshape(x.shape)


def make_moe(n_experts=4, top_k=2, dim=16, ffn=24, seed=0) -> MoEFeedForward:
    torch.manual_seed(seed)
    moe = MoEFeedForward(dim, ffn, n_experts, top_k).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def test_grouped_dispatch_matches_per_token_reference():
    for n_experts, top_k in [(4, 1), (4, 2), (8, 3), (3, 3)]:
        moe = make_moe(n_experts, top_k)
        x = torch.randn(2, 10, 16, dtype=torch.float64)
        out, logits = moe(x)
        assert logits.shape == (20, n_experts)
        assert torch.allclose(out, naive_moe(moe, x), atol=1e-12)


def test_gradients_reach_router_and_every_used_expert():
    moe = make_moe()
    x = torch.randn(4, 8, 16, dtype=torch.float64)
    out, _ = moe(x)
    out.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    used = expert_load(moe.router(x.reshape(-1, 16)), 2) > 0
    assert (moe.gate_proj.grad.flatten(1).abs().sum(1) > 0).eq(used).all()


def test_identical_experts_give_the_single_expert_output():
    moe = make_moe()
    with torch.no_grad():
        for p in (moe.gate_proj, moe.up_proj, moe.down_proj):
            p.copy_(p[:1].expand_as(p))
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    single = moe.down_proj[0] @ (F.silu(moe.gate_proj[0] @ x[..., None]) * (moe.up_proj[0] @ x[..., None]))
    assert torch.allclose(moe(x)[0], single.squeeze(-1), atol=1e-12)


def test_route_renormalises_and_picks_largest():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    w, e = route(logits, 2)
    assert e.tolist() == [[1, 2]] and torch.allclose(w.sum(-1), torch.ones(1))
    assert torch.allclose(w[0, 0] / w[0, 1], torch.tensor(math.e))


def test_balance_and_z_losses_and_load_metrics():
    n, E = 4000, 8
    balanced = torch.randn(n, E) * 1e-3  # near-uniform probabilities, near-uniform assignment
    assert abs(load_balancing_loss(balanced, 2).item() - 1.0) < 0.05
    collapsed = torch.zeros(n, E)
    collapsed[:, :2] = 10.0
    assert load_balancing_loss(collapsed, 2).item() > 3.5
    assert abs(router_z_loss(torch.zeros(n, E)).item() - math.log(E) ** 2) < 1e-5
    counts = expert_load(collapsed, 2)
    assert counts.tolist() == [n, n, 0, 0, 0, 0, 0, 0]
    assert abs(load_entropy(counts) - math.log(2) / math.log(8)) < 1e-9
    assert abs(load_entropy(torch.full((E,), 10)) - 1.0) < 1e-12


def elements_written_by_backward(moe: MoEFeedForward, x: torch.Tensor) -> int:
    """Elements of every tensor the backward pass writes (views excluded): its memory traffic, device-free."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Count(TorchDispatchMode):
        written = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                Count.written += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    loss = moe(x)[0].square().sum()
    with Count():
        loss.backward()
    return Count.written


def test_backward_traffic_grows_no_faster_than_the_expert_weights():
    """Indexing the stacked weights per expert made backward zero-fill a full (E, F, D) gradient for each of
    the E experts (E^2 traffic: 62% over a dense FFN at 16 experts). Counted, not timed: 4 -> 16 experts
    must not multiply the backward's writes by more than the parameter count grows."""
    x = torch.randn(256, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    small, large = make_moe(n_experts=4, dim=16, ffn=32), make_moe(n_experts=16, dim=16, ffn=32)
    params = [sum(p.numel() for p in m.parameters()) for m in (small, large)]
    written = [elements_written_by_backward(m, x) for m in (small, large)]
    assert written[1] / written[0] < params[1] / params[0]


# ------------------------------------------------------------------------------------------ expert paths
from models.moe import EXPERT_IMPLS, grouped_mm_runs, set_expert_impl, tokens_per_expert  # noqa: E402
import pytest  # noqa: E402

# bf16 keeps 8 mantissa bits: paths that round intermediates in different places differ by a few bf16 ulps
# of the largest value (2^-8 relative); fp32 paths differ by summation order only.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=0, atol=3e-2)}


def _paths(dtype: torch.dtype) -> list[str]:
    """The expert paths that run for dtype on this CPU (grouped_mm needs torch >= 2.11 here)."""
    return ["loop_op"] + (["grouped_mm"] if grouped_mm_runs(torch.device("cpu"), dtype) else [])


def _run(impl: str, state: torch.dtype, autocast: bool, n_tokens: int = 24, n_experts: int = 6):
    """Output and gradients (x, router, gate, up, down) of one seeded layer, in fp32 for comparison."""
    moe = make_moe(n_experts=n_experts, top_k=2, dim=16, ffn=32).to(state)
    moe.impl = impl
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_tokens, 16, generator=gen).to(state).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, _ = moe(x)
    weights = torch.randn(y.shape, generator=gen)  # a dense upstream gradient (grouped_mm wants strided ones)
    (y.float() * weights).sum().backward()
    grads = [x.grad, moe.router.weight.grad, moe.gate_proj.grad, moe.up_proj.grad, moe.down_proj.grad]
    return [t.float() for t in [y, *grads]]


def _scale(t: torch.Tensor) -> float:
    return max(t.abs().max().item(), 1e-30)


@pytest.mark.parametrize("state,autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_every_expert_path_equals_the_loop_in_value_and_gradient(state, autocast):
    dtype = torch.bfloat16 if autocast else state
    paths = _paths(dtype)
    assert "loop_op" in paths
    ref = _run("loop", state, autocast)
    for impl in paths:
        for name, got, want in zip(["y", "x", "router", "gate", "up", "down"], _run(impl, state, autocast), ref):
            tol = TOL[dtype]
            assert torch.allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * _scale(want)), (impl, name)


def test_idle_experts_get_zero_gradient_on_every_path():
    """2 tokens x top-2 reach at most 4 of 8 experts: the others must get an exact zero gradient, every path."""
    for dtype in (torch.float32, torch.bfloat16):
        for impl in ["loop"] + _paths(dtype):
            y, _, _, gate, up, down = _run(impl, dtype, False, n_tokens=2, n_experts=8)
            idle = gate.flatten(1).abs().sum(1) == 0
            assert idle.sum() >= 4, impl
            assert torch.equal(idle, up.flatten(1).abs().sum(1) == 0) and torch.equal(idle, down.flatten(1).abs().sum(1) == 0)
            assert torch.isfinite(y).all()


def test_float64_keeps_the_exact_loop_and_loop_op_matches_it():
    moe = make_moe()
    assert moe.resolved_impl(torch.zeros(1, 16, dtype=torch.float64)) == "loop"
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    moe.impl = "loop_op"
    assert torch.allclose(moe(x)[0], naive_moe(moe, x), atol=1e-12)


def test_auto_picks_the_measured_eager_path_and_grouped_mm_or_the_op_under_compile():
    moe = MoEFeedForward(16, 32, 4, 2)
    assert moe.resolved_impl(torch.zeros(1, 16)) == "loop"  # fp32 eager on CPU: the loop was the faster
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = "grouped_mm" if grouped_mm_runs(torch.device("cpu"), torch.bfloat16) else "loop"
        assert moe.resolved_impl(torch.zeros(1, 16)) == expected
    assert not grouped_mm_runs(torch.device("cpu"), torch.float32, compiling=True)  # its meta wants bf16
    assert not grouped_mm_runs(torch.device("cpu"), torch.float64)
    model = torch.nn.Sequential(MoEFeedForward(16, 32, 4, 2))
    assert set_expert_impl(model, "loop_op")[0].impl == "loop_op"
    with pytest.raises(ValueError, match="must be one of"):
        set_expert_impl(model, "fast")
    assert set(EXPERT_IMPLS) == {"auto", "loop", "grouped_mm", "loop_op"}


def test_tokens_per_expert_counts_on_the_device_as_bincount_does():
    ids = torch.randint(0, 8, (50, 2), generator=torch.Generator().manual_seed(0))
    ids[ids == 3] = 4  # an idle expert
    counts = tokens_per_expert(ids, 8)
    assert counts.dtype == torch.int64 and torch.equal(counts, torch.bincount(ids.flatten(), minlength=8))


@pytest.mark.parametrize("impl", ["grouped_mm", "loop_op"])
def test_sync_free_paths_trace_as_one_graph_forward_and_backward(impl):
    """fullgraph tracing fails on any host read (.tolist(), .item(), a data-dependent shape) outside an operator:
    grouped_mm and the op's paths trace as one graph (aot_eager: forward and backward, no code generation);
    the loop does not."""
    dtype = torch.bfloat16 if impl == "grouped_mm" else torch.float32
    if impl not in _paths(dtype):
        pytest.skip("torch's grouped_mm has no CPU kernel in this torch")
    moe = make_moe(n_experts=4, dim=16, ffn=32).to(dtype)
    moe.impl = impl
    x = torch.randn(12, 16, dtype=dtype, requires_grad=True)
    y, _ = torch.compile(moe, fullgraph=True, backend="aot_eager")(x)
    y.float().square().sum().backward()
    assert torch.allclose(y.float(), _with(moe, "loop")(x)[0].float(), atol=3e-2 * _scale(y.float()))
    moe.impl = "loop"
    torch._dynamo.reset()
    with pytest.raises(Exception):
        torch.compile(moe, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()


def _with(moe: MoEFeedForward, impl: str) -> MoEFeedForward:
    moe.impl = impl
    return moe

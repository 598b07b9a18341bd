"""Tests of transfer/checks/stream.py and the bounded-memory paths of the checks: a model evaluated block by block
in float64 computes what its whole float64 copy computes, the block-by-block gradient equals the one-graph
gradient, and the checks give the same verdicts and figures whether they hold a model whole or stream it (the path
a model too large for the budgets takes), on correct and broken growths, without copying a whole model."""
import copy

import pytest
import torch

import transfer.checks.pair as pair_module
import transfer.checks.stream as stream
import transfer.checks.trainability as trainability
from config import TrainConfig
from tests.growth_pairs import make_model, moe_pair, source, story_tokens
from transfer.checks import detailed_growth_check, upcycling_check
from transfer.checks.objective import objective_gradients
from transfer.checks.pair import copy_model
from transfer.simple_growth import dense_to_moe, scale_bilaterally

TC = TrainConfig()


def streamed(monkeypatch) -> None:
    """Budgets of zero: no block copy kept, no one-graph gradient, step-1 block gradients recomputed."""
    monkeypatch.setattr(stream, "REUSE_BYTES", 0)
    monkeypatch.setattr(trainability, "KEEP_GRADIENT_BYTES", 0)


def test_forward_block_by_block_equals_the_whole_float64_copy():
    old, new = moe_pair(extra=1)
    t = story_tokens(2, 32)
    got = stream.forward_details(new, t, torch.float64)
    ref = copy_model(new, torch.float64)(t, return_details=True)
    assert torch.equal(got.logits, ref.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, ref.hidden_states))
    assert all(torch.equal(a, b) for a, b in zip(got.router_logits, ref.router_logits))
    assert new.embed.weight.dtype == torch.float32  # the model stays as it is


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_block_by_block_gradient_equals_the_one_graph_gradient(monkeypatch, kind):
    model = scale_bilaterally(source(kind), 2, 1)
    model.norm.weight.requires_grad_(False)  # frozen: still differentiated
    t = story_tokens(2, 32)
    whole = objective_gradients(model, t, TC, block_io=True, dtype=torch.float64)
    monkeypatch.setattr(stream, "REUSE_BYTES", 0)
    handed = {}
    blockwise = objective_gradients(model, t, TC, block_io=True, dtype=torch.float64,
                                    consume=lambda n, g: handed.setdefault(n, []).append(g))
    assert blockwise.grads == {} and set(handed) == set(whole.grads) and all(len(v) == 1 for v in handed.values())
    for n, g in whole.grads.items():
        torch.testing.assert_close(handed[n][0], g, rtol=1e-12, atol=1e-18)
    assert blockwise.ce == pytest.approx(whole.ce, rel=1e-14) and blockwise.total == pytest.approx(whole.total, rel=1e-14)
    for a, b in zip(blockwise.block_output_grads, whole.block_output_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-18)
    assert all(torch.equal(a, b) for a, b in zip(blockwise.block_inputs, whole.block_inputs))


def _frozen(model):
    model.blocks[1].attention.q_proj.weight.requires_grad_(False)
    return model


def _dead(model):  # a whole FFN zeroed on both sides of its product: never gets gradient
    with torch.no_grad():
        model.blocks[0].ffn.up_proj.zero_()
        model.blocks[0].ffn.down_proj.zero_()
    return model


def _zero_head(model):  # nothing reaches the blocks: step 2 evaluates the whole stepped model
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


GROWTHS = {
    "moe x2 +2": lambda: moe_pair(extra=2),
    "dense x2 +1": lambda: (source("dense"), scale_bilaterally(source("dense"), 2, 1)),
    "pure clones": lambda: (source("dense"), scale_bilaterally(source("dense"), 2, 2, noise_std=0.0)),
    "frozen weight": lambda: (source("dense"), _frozen(scale_bilaterally(source("dense"), 2, 1))),
    "dead FFN": lambda: (source("moe"), _dead(scale_bilaterally(source("moe"), 2, 2))),
    "zero LM head": lambda: (source("dense"), _zero_head(scale_bilaterally(source("dense"), 2, 1))),
}


def _figures(report):
    return {k: (r.passed, r.quantity, r.value, r.message) for k, r in report.results.items()}


@pytest.mark.parametrize("name", list(GROWTHS))
def test_streamed_checks_judge_as_the_whole_model_checks(monkeypatch, name):
    old, new = GROWTHS[name]()
    t = story_tokens()
    ref = _figures(detailed_growth_check(old, new, t, verbose=False))
    streamed(monkeypatch)
    got = _figures(detailed_growth_check(old, new, t, verbose=False))
    assert [(k, v[:2]) for k, v in got.items()] == [(k, v[:2]) for k, v in ref.items()]
    for k in ref:
        if ref[k][2] is not None:
            assert got[k][2] == pytest.approx(ref[k][2], rel=1e-6, abs=1e-12), k
    assert {k: v[0] for k, v in ref.items()} == {k: v[0] for k, v in got.items()}
    if name in ("pure clones", "frozen weight", "dead FFN", "zero LM head"):
        assert not all(v[0] for v in got.values())
    else:
        assert all(v[0] for v in got.values())


def test_upcycling_streamed_judges_as_whole(monkeypatch):
    dense = make_model(0)
    moe = dense_to_moe(dense, 4, 2, seed=0)
    t = story_tokens()
    ref = _figures(upcycling_check(dense, moe, t, verbose=False))
    streamed(monkeypatch)
    got = _figures(upcycling_check(dense, moe, t, verbose=False))
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in ref.items()}


def test_the_checks_copy_no_whole_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a whole-model copy was made")
    monkeypatch.setattr(pair_module, "copy_model", refuse)
    old, new = moe_pair(extra=1)
    before = copy.deepcopy(new.state_dict())
    assert detailed_growth_check(old, new, story_tokens(), verbose=False).passed
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())


@pytest.mark.parametrize("one_graph", [True, False])
def test_the_gradients_forward_is_the_forward_the_output_checks_read(monkeypatch, one_graph):
    """objective_gradients(details=True) hands over the forward it made: stream.forward_details' outputs on the
    objective's inputs, in both gradient paths; a pair given them for its first rows computes the rest alone."""
    _, new = moe_pair(extra=1)
    t = story_tokens(4, 33)
    if not one_graph:
        monkeypatch.setattr(stream, "REUSE_BYTES", 0)
    got = objective_gradients(new, t[:2], TC, block_io=True, dtype=torch.float64, details=True).details
    ref = stream.forward_details(new, t[:2, :-1], torch.float64)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-12, atol=1e-14)
    assert len(got.hidden_states) == len(ref.hidden_states) == new.config.n_layers + 1
    for a, b in zip(got.hidden_states + got.router_logits, ref.hidden_states + ref.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert objective_gradients(new, t[:2], TC, dtype=torch.float64).details is None  # kept only when asked

    old, _ = moe_pair(extra=1)
    calls = []
    real = stream.forward_details
    monkeypatch.setattr(stream, "forward_details", lambda m, tok, dt: calls.append((m is new, len(tok))) or real(m, tok, dt))
    pair = pair_module.ModelPair(old, new, t[:, :-1], torch.float64)
    pair.share_new(got)
    joined = pair.outputs()[1]
    assert sorted(calls) == [(False, 4), (True, 2)]  # the new model's forward on the other two rows only
    whole = real(new, t[:, :-1], torch.float64)
    torch.testing.assert_close(joined.logits, whole.logits, rtol=1e-12, atol=1e-14)
    for a, b in zip(joined.hidden_states + joined.router_logits, whole.hidden_states + whole.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_adamw_first_step_in_slabs_equals_the_formula(monkeypatch):
    """The step computed a slab of rows at a time, in place or not, is AdamW's first update to the last bit."""
    tc = TrainConfig()
    g = torch.randn(3, 7, 5, dtype=torch.float64)
    g[1, 2] = 0
    w = torch.randn(3, 7, 5, dtype=torch.float64)
    lr = 1e-3
    ref = w * (1 - lr * tc.weight_decay) - lr * g / (g.abs() + trainability.ADAM_EPS)
    monkeypatch.setattr(trainability, "STEP_SLAB", 6)  # slabs of one row of 5 (a slab never splits a row)
    torch.testing.assert_close(trainability._adamw_first_step(w, g, lr, tc), ref, rtol=1e-15, atol=0)
    mine = w.clone()
    assert trainability._adamw_first_step(mine, g, lr, tc, out=mine) is mine
    torch.testing.assert_close(mine, ref, rtol=1e-15, atol=0)
    v = torch.randn(5, dtype=torch.float64)  # a vector: no decay
    gv = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(trainability._adamw_first_step(v, gv, lr, tc), v - lr * gv / (gv.abs() + 1e-8),
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("noise", [0.3, 0.0])
def test_the_later_step_keeps_unmoved_weights_with_the_same_verdicts(monkeypatch, noise):
    """Weights whose step-1 gradient is exactly zero (an inserted block's q/k/v, gate and up) stay as they are in
    the later evaluation instead of being scaled by weight decay: the same figures to within that scaling, and the
    same verdicts, for noisy clones (pass) and pure clones (fail) in inserted blocks."""
    old, new = moe_pair(extra=2) if noise else (source("moe"), scale_bilaterally(source("moe"), 2, 2, noise_std=0.0))
    t = story_tokens()
    got = _figures(detailed_growth_check(old, new, t, verbose=False))
    monkeypatch.setattr(trainability, "_moves", lambda grad: True)  # every weight stepped, decay included
    ref = _figures(detailed_growth_check(old, new, t, verbose=False))
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in ref.items()}
    for k in ref:
        if ref[k][2] is not None:
            assert got[k][2] == pytest.approx(ref[k][2], rel=1e-4, abs=1e-12), k
    assert got["symmetry"][0] is bool(noise)

"""Tests of transfer/checks/objective.py: the checks' objective is the pipeline's (training.loop.lm_loss), and its
gradient is taken without touching the model (no .grad, no requires_grad change, weights unchanged)."""
import copy

import pytest
import torch

from config import TrainConfig
from tests.growth_pairs import make_model, story_tokens
from training.loop import lm_loss
from transfer.checks.objective import objective, objective_gradients
from transfer.simple_growth import dense_to_moe, scale_bilaterally

TC = TrainConfig()


@pytest.mark.parametrize("kind", ["dense", "moe", "upcycled_grown"])
def test_objective_is_the_pipelines_lm_loss(kind):
    model = {"dense": lambda: make_model(0),
             "moe": lambda: make_model(1, n_experts=4, top_k=2),
             "upcycled_grown": lambda: scale_bilaterally(dense_to_moe(make_model(2), 4, 2), 2, 1)}[kind]()
    t = story_tokens(2, 32)
    x, y = t[:, :-1], t[:, 1:]
    ce, total = objective(model(x, return_details=True), y, model.config.top_k, TC)
    ref_ce, ref_total = lm_loss(model, x, y, TC)
    assert torch.equal(ce, ref_ce) and torch.equal(total, ref_total)
    if model.config.is_moe:
        assert total > ce  # the balance and z losses are in


def test_gradients_equal_backward_and_leave_the_model_untouched():
    model = make_model(0, n_experts=4, top_k=2).double()
    model.norm.weight.requires_grad_(False)  # a frozen weight: still differentiated, still frozen afterwards
    stale = torch.ones_like(model.embed.weight)
    model.embed.weight.grad = stale.clone()
    before = copy.deepcopy(model.state_dict())
    t = story_tokens(2, 32)
    g = objective_gradients(model, t, TC)
    assert model.embed.weight.grad is not None and torch.equal(model.embed.weight.grad, stale)
    assert not model.norm.weight.requires_grad and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    reference = copy.deepcopy(model)
    reference.norm.weight.requires_grad_(True)
    reference.zero_grad(set_to_none=True)
    lm_loss(reference, t[:, :-1], t[:, 1:], TC)[1].backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(g.grads[name], p.grad, rtol=1e-4, atol=1e-9)  # lm_loss takes its CE in fp32
    assert [c.tolist() for c in g.expert_tokens] == [
        c.tolist() for c in (torch.bincount(e, minlength=4) for e in _experts(model, t))]
    assert set(g.input_ids.tolist()) == set(t[:, :-1].flatten().tolist())


def _experts(model, t):
    from models import route

    out = model(t[:, :-1], return_details=True)
    return [route(r, model.config.top_k)[1].flatten() for r in out.router_logits]


def test_gradients_at_other_values_and_for_a_subset():
    model = make_model(0).double()
    t = story_tokens(2, 32)
    moved = {n: p.detach() * 1.1 for n, p in model.named_parameters()}
    names = ["blocks.0.attention.q_proj.weight", "blocks.1.ffn.up_proj.weight"]
    g = objective_gradients(model, t, TC, values=moved, wrt=names)
    assert set(g.grads) == set(names)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(1.1)
    lm_loss(scaled, t[:, :-1], t[:, 1:], TC)[1].backward()
    for n in names:
        torch.testing.assert_close(g.grads[n], scaled.get_parameter(n).grad, rtol=1e-4, atol=1e-9)  # lm_loss takes its CE in fp32
    assert all(p.grad is None for p in model.parameters())

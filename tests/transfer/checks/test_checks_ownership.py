"""Tests of transfer/checks/ownership.py through the trainability check: a grown model in which some weight the
batch reaches can never be updated (frozen, a buffer, one tensor serving several places, aliasing experts) is
rejected with the parameters named and the fix, never a traceback; harmless layouts (the declared tie, disjoint
slices of one fused tensor, equal but separate copies) pass."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.growth_pairs import source, story_tokens
from transfer.checks.ownership import FIX_OWNERSHIP, measure_ownership, own_tensors
from transfer.simple_growth import dense_to_moe, scale_bilaterally
from transfer.verify_growth_mechanics import check_trainability, detailed_growth_check, upcycling_check

CHECKS = {"rope", "router", "symmetry", "functional", "trainability"}


@pytest.fixture(scope="module")
def grown():
    old = source("moe")
    return old, scale_bilaterally(old, 2, 2)


def frozen_block(m):
    m.blocks[1].requires_grad_(False)  # an inserted block


def frozen_embedding(m):
    m.embed.weight.requires_grad_(False)


def frozen_old_block(m):
    m.blocks[2].attention.v_proj.weight.requires_grad_(False)


def router_for_every_layer(m):
    for b in m.blocks:
        b.ffn.router = m.blocks[0].ffn.router


def inserted_reuses_source_module(m):
    m.blocks[1].attention.q_proj = m.blocks[0].attention.q_proj


def inserted_reuses_source_parameter(m):
    m.blocks[3].ffn.gate_proj = m.blocks[2].ffn.gate_proj


def view_of_another_block(m):
    m.blocks[3].attention.v_proj.weight = nn.Parameter(m.blocks[2].attention.v_proj.weight.data)


def weight_as_buffer(m):
    lin = m.blocks[2].attention.k_proj
    w = lin.weight.detach().clone()
    del lin.weight
    lin.register_buffer("weight", w)


def experts_one_tensor(m):
    f = m.blocks[0].ffn
    f.up_proj = nn.Parameter(f.up_proj.detach()[:1].expand_as(f.up_proj))


def undeclared_tie(m):
    m.lm_head.weight = m.embed.weight  # config says tie_embeddings=False


BROKEN = {"frozen inserted block": (frozen_block, "frozen (requires_grad=False): blocks.1."),
          "frozen embedding": (frozen_embedding, "frozen (requires_grad=False): embed.weight"),
          "frozen old block": (frozen_old_block, "blocks.2.attention.v_proj.weight"),
          "one router for every layer": (router_for_every_layer, "one tensor shared by 4 places"),
          "inserted block reuses its source's module": (inserted_reuses_source_module,
                                                        "blocks.0.attention.q_proj.weight, blocks.1.attention.q_proj.weight"),
          "inserted block reuses its source's parameter": (inserted_reuses_source_parameter, "blocks.3.ffn.gate_proj"),
          "a view of another block's weight": (view_of_another_block, "blocks.3.attention.v_proj.weight"),
          "weight registered as a buffer": (weight_as_buffer, "not a trainable nn.Parameter"),
          "experts as views of one tensor": (experts_one_tensor, "aliasing"),
          "a tie the config does not declare": (undeclared_tie, "embed.weight, lm_head.weight")}


@pytest.mark.parametrize("name", BROKEN)
def test_unmovable_weights_are_rejected_with_names_and_fix(name, grown, single_thread):
    old, good = grown
    bad = copy.deepcopy(good)
    mutate, named = BROKEN[name]
    mutate(bad)
    rep = detailed_growth_check(old, bad, story_tokens(), verbose=False)
    assert set(rep.results) == CHECKS, name  # every check ran: no crash, no KeyError
    t = rep.results["trainability"]
    assert not t.passed and FIX_OWNERSHIP in t.fix and named in t.message, (name, t.message)
    assert "can never be updated by the optimizer" in t.message and t.value > t.limit == 0
    assert not check_trainability(bad, story_tokens()).passed, name


def test_frozen_weight_did_not_move_under_adamw(grown):
    """The finding is real: three AdamW steps leave a frozen inserted block exactly where it was."""
    _, good = grown
    bad = copy.deepcopy(good)
    frozen_block(bad)
    before = bad.blocks[1].attention.q_proj.weight.clone()
    opt = torch.optim.AdamW([p for p in bad.parameters() if p.requires_grad], lr=1e-3)
    tokens = story_tokens()
    for _ in range(3):
        torch.nn.functional.cross_entropy(bad(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(bad.blocks[1].attention.q_proj.weight, before)


def test_one_router_for_every_layer_in_upcycling_is_rejected():
    dense = source("dense")
    moe = dense_to_moe(dense, 4, 2)
    router_for_every_layer(moe)
    t = upcycling_check(dense, moe, story_tokens(), verbose=False).results["trainability"]
    assert not t.passed and "blocks.0.ffn.router.weight, blocks.1.ffn.router.weight" in t.message


def fused_qkv(m):
    """q, k, v as disjoint slices of one fused tensor: each owns its memory, the optimizer moves each."""
    for b in m.blocks:
        a = b.attention
        parts = [a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data]
        q, k, v = torch.cat(parts).clone().split([p.shape[0] for p in parts])
        a.q_proj.weight, a.k_proj.weight, a.v_proj.weight = nn.Parameter(q), nn.Parameter(k), nn.Parameter(v)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_harmless_layouts_pass(kind, single_thread):
    """The declared embedding/LM-head tie (dense source: tie_embeddings) and fused disjoint slices: no finding,
    and the growth passes all five checks."""
    old = source(kind)
    good = scale_bilaterally(old, 1, 2)  # width unchanged: a tied source stays tied
    assert measure_ownership(good).problems() == []
    fused = copy.deepcopy(good)
    fused_qkv(fused)
    assert measure_ownership(fused).problems() == []
    rep = detailed_growth_check(old, fused, story_tokens(), verbose=False)
    assert rep.passed, rep.summary()


def test_own_tensors_keeps_the_function_and_the_declared_tie():
    m = source("dense")  # tied
    bad = copy.deepcopy(m)
    inserted_reuses_source_module(bad)
    fixed = own_tensors(copy.deepcopy(bad))
    assert fixed.lm_head.weight is fixed.embed.weight
    assert fixed.blocks[1].attention.q_proj is not fixed.blocks[0].attention.q_proj
    tokens = story_tokens()
    assert torch.equal(fixed(tokens), bad(tokens))
    assert measure_ownership(fixed).problems() == []

"""Tests of matching cloned units by what they compute (transfer/checks/clones.py) in the RoPE, symmetry and
clone-divergence checks: any consistent relabelling of heads (kv groups kept together), neurons or experts, and an
interleaved residual layout, pass where the tiled original passes and fail where it fails; an inconsistent
relabelling fails. Also: inserted blocks' clones judged at step 2 (where they first get gradient), and dead units
inherited from the source told apart from those growth caused."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.growth_pairs import source, story_tokens
from tests.relabel import interleave_order, permute_residual, relabel_experts, relabel_heads, relabel_neurons
from transfer.checks.clones import group_copies, positional, residual_groups, residual_map, unit_signatures
from transfer.checks.divergence import measure_clone_divergence
from transfer.checks.rope import FIX_RELABEL
from transfer.checks.trainability import FIX_INHERITED
from transfer.simple_growth import scale_bilaterally
from transfer.verify_growth_mechanics import (FIX_SYMMETRY, FIX_TRAINABILITY, check_rope_integrity,
                                              check_symmetry_breaking, detailed_growth_check)


def relabelled(model, how: str):
    """The same function under another labelling of its units."""
    if how == "heads":
        return relabel_heads(model, seed=1)
    if how == "heads+neurons":
        return relabel_neurons(relabel_heads(model, seed=2), seed=3)
    if how == "interleaved residual":
        return permute_residual(model, interleave_order(model.config.dim, 2))
    if how == "experts":
        return relabel_experts(model, seed=4)
    return relabel_neurons(relabel_heads(permute_residual(model, interleave_order(model.config.dim, 2)), 5), 6)


HOWS = ["heads", "heads+neurons", "interleaved residual", "all at once"]


def test_grouping_finds_copies_in_any_order():
    gen = torch.Generator().manual_seed(0)
    units = torch.randn(5, 12, generator=gen)
    tiled = units.repeat(3, 1)  # copy c of unit u at u + 5c
    assert torch.equal(group_copies(unit_signatures(tiled, 15), 3), positional(3, 5))
    perm = torch.randperm(15, generator=gen)
    groups = group_copies(unit_signatures(tiled[perm], 15), 3)
    assert groups is not None
    for u in range(5):
        assert len({int(perm[i]) % 5 for i in groups[:, u]}) == 1  # one unit's copies together
    assert group_copies(unit_signatures(torch.randn(15, 12, generator=gen), 15), 3) is None  # no copies at all


def test_residual_map_reads_the_layout_off_the_embedding():
    old = source("dense")
    big = scale_bilaterally(old, 2, 0)
    assert torch.equal(residual_map(old.embed.weight, big.embed.weight, 2), positional(2, 32))
    inter = permute_residual(big, interleave_order(64, 2))
    assert torch.equal(residual_map(old.embed.weight, inter.embed.weight, 2), torch.arange(64).view(32, 2).t())
    assert residual_groups(inter.embed.weight, 2) is not None
    assert residual_map(old.embed.weight, torch.randn(300, 64), 2) is None


@pytest.mark.parametrize("kind", ["dense", "gqa", "moe"])
@pytest.mark.parametrize("how", HOWS)
def test_consistent_relabellings_pass_every_check(kind, how, single_thread):
    old = source(kind)
    new = relabelled(scale_bilaterally(old, 2, 2), how)
    rep = detailed_growth_check(old, new, story_tokens(), verbose=False)
    assert rep.passed, (kind, how, rep.summary())
    if "heads" in how or how == "all at once":
        assert rep.results["rope"].metrics["head_relabelling"]  # matched by attention, not by position


@pytest.mark.parametrize("how", HOWS)
def test_relabelled_pure_clones_still_fail_symmetry(how, single_thread):
    """Relabelling must not hide pure clones by comparing a unit with a stranger."""
    old = source("gqa")
    new = relabelled(scale_bilaterally(old, 2, 2, noise_std=0.0), how)
    r = check_symmetry_breaking(new, story_tokens())
    assert not r.passed and r.fix == FIX_SYMMETRY and r.metrics["pairs_identical"] > 0, (how, r.message)


def test_inconsistent_relabelling_fails_rope():
    """q, k, v rows permuted but o_proj columns left in place: attention matches some old head, but the heads'
    writes do not; and q alone permuted: no old head attends like them."""
    old = source("gqa")
    big = scale_bilaterally(old, 2, 2)
    r = check_rope_integrity(old, relabel_heads(big, seed=1, consistent=False), story_tokens())
    assert not r.passed and r.fix == FIX_RELABEL and r.value > r.limit, r.message
    q_only = copy.deepcopy(big)
    with torch.no_grad():
        w = q_only.blocks[0].attention.q_proj.weight
        hd = old.config.head_dim
        w.copy_(w.view(-1, hd, w.shape[1]).roll(1, dims=0).reshape(w.shape))
    r = check_rope_integrity(old, q_only, story_tokens())
    assert not r.passed and "attend differently" in r.message


@pytest.mark.parametrize("how", HOWS + ["experts"])
def test_divergence_is_the_same_under_relabelling(how):
    old = source("moe")
    for noise in (0.3, 0.0):
        big = scale_bilaterally(old, 2, 2, noise_std=noise)
        with torch.no_grad():  # as after some training: copies apart by a little
            for p in big.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        ref, got = measure_clone_divergence(big, 2), measure_clone_divergence(relabelled(big, how), 2)
        for kind in ("attention_heads", "ffn_neurons", "residual"):
            assert got[kind] == pytest.approx(ref[kind], rel=1e-4), (how, noise, kind)


def test_positional_divergence_of_a_relabelled_model_would_read_strangers():
    """Why matching matters: by position, relabelled pure clones look far apart (a stall missed)."""
    old = source("dense")
    pure = scale_bilaterally(old, 2, 0, noise_std=0.0)
    assert measure_clone_divergence(relabel_heads(pure, seed=1), 2)["attention_heads"] == 0.0
    q = relabel_heads(pure, seed=1).blocks[0].attention.q_proj.weight
    by_position = (q[:32] - q[32:]).norm() / q[:32].norm()
    assert by_position > 0.5


def noise_free_inserted_blocks(old, extra: int = 2):
    """Noise everywhere, except the inserted blocks, copied from a noise-free widening."""
    big, clean = scale_bilaterally(old, 2, extra), scale_bilaterally(old, 2, extra, noise_std=0.0)
    for j in (1, 3):
        big.blocks[j].load_state_dict(clean.blocks[j].state_dict())
    return big


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_pure_clones_in_inserted_blocks_fail_at_step_2(kind, single_thread):
    old = source(kind)
    bad = noise_free_inserted_blocks(old)
    rep = detailed_growth_check(old, bad, story_tokens(), verbose=False)
    r = rep.results["symmetry"]
    assert not r.passed and r.fix == FIX_SYMMETRY and "inserted blocks receive identical gradients at step 2" in r.message
    assert "block 1" in r.message and r.value < r.limit
    assert not check_symmetry_breaking(bad, story_tokens()).passed
    good = detailed_growth_check(old, scale_bilaterally(old, 2, 2), story_tokens(), verbose=False).results["symmetry"]
    assert good.passed and good.metrics["later_pairs_tested"] > 0 and "at step 2" in good.message


def test_pure_clones_in_inserted_blocks_stay_identical_under_adamw():
    """The finding is real: after three AdamW steps of the pipeline's objective, the inserted block's head copies
    are still equal to the last digit, while the noisy growth's have moved apart."""
    old = source("dense")
    tokens = story_tokens()
    for model, equal in ((noise_free_inserted_blocks(old), True), (scale_bilaterally(old, 2, 2), False)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
        q = model.blocks[1].attention.q_proj.weight
        assert torch.equal(q[:32], q[32:]) is equal


def zero_expert(model, expert: int):
    with torch.no_grad():
        for b in model.blocks:
            for w in (b.ffn.gate_proj, b.ffn.up_proj, b.ffn.down_proj):
                w[expert].zero_()
    return model


def test_dead_expert_inherited_from_the_source_is_reported_as_inherited(single_thread):
    """An expert the source never used (all zero there) is dead in the grown model too: the diagnosis says so
    and points at the source, not at the growth recipe."""
    tokens = story_tokens()
    old = zero_expert(source("moe"), 1)
    with torch.no_grad():
        for b in old.blocks:
            b.ffn.router.weight[1] = 10.0 * b.ffn.router.weight.abs().max()  # routed to once grown: reached
    t = detailed_growth_check(old, scale_bilaterally(old, 2, 2), tokens, verbose=False).results["trainability"]
    assert not t.passed and FIX_INHERITED in t.fix and FIX_TRAINABILITY not in t.fix, t.message
    assert "inherited from the source model and not caused by growth" in t.message


def test_dead_units_caused_by_growth_are_not_called_inherited(single_thread):
    old = source("dense")
    big = scale_bilaterally(old, 2, 2)
    with torch.no_grad():
        big.blocks[1].attention.v_proj.weight.zero_()  # inserted: o_proj already zero, now v too
    t = detailed_growth_check(old, big, story_tokens(), verbose=False).results["trainability"]
    assert not t.passed and t.fix == FIX_TRAINABILITY and "inherited" not in t.message

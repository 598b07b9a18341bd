"""Tests of transfer/checks/pair.py: the pair is validated in one place, copied once, never touched."""
from dataclasses import replace

import pytest
import torch

from tests.growth_pairs import make_model, rebuild, source, story_tokens
from transfer.checks.pair import ModelPair, config_changes, pair_problem, rejected_pair, relative_drift
from transfer.checks.results import FIX_PAIR
from transfer.simple_growth import scale_bilaterally


def test_problems_of_pairs_that_are_no_grown_pair():
    old = make_model(0)
    assert pair_problem(old.config, scale_bilaterally(old, 2, 1).config) is None
    assert "not an integer multiple" in pair_problem(old.config, make_model(0, dim=48, n_heads=4).config)
    assert "fewer layers" in pair_problem(scale_bilaterally(old, 1, 1).config, old.config)
    assert "vocabulary changed" in pair_problem(old.config, make_model(0, vocab_size=320).config)
    assert "context shrank" in pair_problem(old.config, make_model(0, max_seq_len=64).config)


def test_rejected_pair_is_one_failed_result_with_the_fix():
    old = make_model(0)
    assert rejected_pair("RoPE integrity", old, scale_bilaterally(old, 2, 0)) is None
    r = rejected_pair("Grown pair", old, make_model(0, vocab_size=320))
    assert not r.passed and r.name == "Grown pair" and r.fix == FIX_PAIR
    assert r.message == "not a grown pair: vocabulary changed from 300 to 320. Fix: pass the model before and after growth."


def test_config_changes_lists_only_fields_growth_must_keep():
    old = make_model(0)
    new = scale_bilaterally(old, 2, 2)
    assert config_changes(old.config, new.config) == []
    assert config_changes(old.config, replace(new.config, norm_eps=1e-6, rope_theta=5e5)) == [
        "rope_theta 10000.0 -> 500000.0", "norm_eps 1e-05 -> 1e-06"]


def test_pair_copies_in_float64_and_shares_outputs():
    old = source("moe")
    new = scale_bilaterally(old, 2, 1)
    t = story_tokens(2, 32)
    pair = ModelPair(old, new, t, torch.float64)
    assert pair.s == 2 and pair.layout == [(0, False), (1, False), (1, True)]
    assert pair.new.embed.weight.dtype == torch.float64 and new.embed.weight.dtype == torch.float32
    assert pair.outputs() is pair.outputs()
    assert pair.tile(torch.tensor([[1.0, 2.0]])).tolist() == [[1.0, 2.0, 1.0, 2.0]]
    with pytest.raises(ValueError, match="max_seq_len"):
        ModelPair(old, new, torch.zeros(1, 129, dtype=torch.long), torch.float64)


def test_relative_drift_is_scale_free():
    ref = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    assert relative_drift(ref + torch.tensor([0, 0, 0, 1e-3]), ref) == pytest.approx(1e-3)
    assert relative_drift(1e6 * ref + torch.tensor([0, 0, 0, 1e3]), 1e6 * ref) == pytest.approx(1e-3)


def test_rebuild_helper_keeps_state():  # the mutation helper the check tests rely on
    good = scale_bilaterally(make_model(0), 2, 1)
    bad = rebuild(replace(good.config, norm_eps=1e-6), good.state_dict())
    assert torch.equal(bad.embed.weight, good.embed.weight) and bad.config.norm_eps == 1e-6

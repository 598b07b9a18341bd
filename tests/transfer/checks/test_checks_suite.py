"""Tests of transfer/checks/suite.py: detailed_growth_check runs five checks on shared copies with one shared
gradient, rejects a non-grown pair once, and its summary names the root cause of a drift (a changed norm_eps),
not the checks that merely inherit it."""
from dataclasses import replace

import pytest

import transfer.checks.suite as suite
import transfer.checks.trainability as trainability
from config import TrainConfig
from tests.growth_pairs import make_model, moe_pair, rebuild, source, story_tokens
from transfer.checks import FIX_ROPE, FIX_ROUTER, detailed_growth_check, upcycling_check
from transfer.checks.trainability import first_step_lr
from transfer.simple_growth import dense_to_moe, scale_bilaterally


def test_five_checks_in_order():
    old = source("moe")
    rep = detailed_growth_check(old, scale_bilaterally(old, 2, 1), story_tokens(), verbose=False)
    assert rep.passed and list(rep.results) == ["rope", "router", "symmetry", "functional", "trainability"]


@pytest.mark.parametrize("extra", [0, 2])
def test_one_whole_model_gradient_serves_symmetry_and_trainability(monkeypatch, extra):
    calls = []

    def counting(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))

    counting(suite, "objective_gradients")
    counting(trainability, "objective_gradients")
    counting(trainability, "_block_gradients")
    old = source("dense")
    rep = detailed_growth_check(old, scale_bilaterally(old, 2, extra), story_tokens(), verbose=False)
    assert rep.passed and calls.count("objective_gradients") == 1
    assert calls.count("_block_gradients") == (extra > 0)  # step 2: the inserted blocks alone


def test_not_a_grown_pair_is_one_result():
    old = source("dense")
    rep = detailed_growth_check(old, make_model(0, vocab_size=320), story_tokens(), verbose=False)
    assert list(rep.results) == ["pair"] and not rep.passed
    assert rep.summary().splitlines()[-1] == "  - pair: pass the model before and after growth"
    assert list(upcycling_check(old, make_model(0, vocab_size=320), story_tokens(), verbose=False).results) == ["pair"]


def test_changed_norm_eps_is_diagnosed_as_the_root_cause():
    old, good = moe_pair(extra=1)
    bad = rebuild(replace(good.config, norm_eps=1e-6), good.state_dict())
    rep = detailed_growth_check(old, bad, story_tokens(), verbose=False)
    failed = [k for k, r in rep.results.items() if not r.passed]
    assert failed == ["rope", "router", "functional"]
    assert rep.results["functional"].metrics["first_bad_stage"] == "attention_norm"
    assert rep.results["rope"].consequence_of and rep.results["router"].consequence_of
    fixes = rep.summary().split("Do not train the grown model; fix:")[1]
    assert FIX_ROUTER not in fixes and FIX_ROPE not in fixes
    assert fixes.count("restore norm_eps (norm_eps 1e-05 -> 1e-06)") == 1
    assert fixes.splitlines()[1].startswith("  - functional: restore norm_eps")


def test_train_config_sets_the_objective_and_step():
    old = source("moe")
    tc = replace(TrainConfig(), grown_lr=1e-4, moe_lr=5e-4)
    rep = detailed_growth_check(old, scale_bilaterally(old, 2, 1), story_tokens(), verbose=False, train_config=tc,
                                lr=first_step_lr(tc.grown_lr, tc))  # what training.transition passes
    assert rep.results["trainability"].metrics["lr"] == pytest.approx(1e-4 / tc.warmup_steps)  # phase 3's first step
    up = upcycling_check(source("dense"), dense_to_moe(source("dense"), 4, 2), story_tokens(), verbose=False,
                         train_config=tc, lr=first_step_lr(tc.moe_lr, tc))
    assert up.results["trainability"].metrics["lr"] == pytest.approx(5e-4 / tc.warmup_steps)

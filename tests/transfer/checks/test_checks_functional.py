"""Tests of transfer/checks/functional.py: the judge on hand-made stats (no models), and the location of a drift
to its first stage (attention_norm, attention, ffn_norm, ffn) on real broken growths, so the fix names it."""
import copy
from dataclasses import replace

import pytest
import torch

from tests.growth_pairs import permute_qk_pairs, rebuild, source, story_tokens
from transfer.checks.functional import (STAGE_FIX, FunctionalLimits, FunctionalStats, check_functional_equivalence,
                                        judge_functional)
from transfer.checks.results import FIX_FUNCTIONAL, FIX_NORM


def stats(drifts, stages=None, changes=()):
    d = {"embedding": drifts[0], **{f"block {j}": x for j, x in enumerate(drifts[1:-1])}, "logits": drifts[-1]}
    labels = ["embedding"] + [f"block {j} (old block {j})" for j in range(len(drifts) - 2)] + ["logits"]
    return FunctionalStats(d, labels, len(drifts) - 2, stages, list(changes))


def test_judge_passes_and_fails_at_the_first_layer_beyond_tolerance():
    assert judge_functional(stats([1e-8, 1e-7, 2e-7, 2e-7])).passed
    r = judge_functional(stats([1e-8, 1e-7, 3e-3, 2e-2], {"attention_norm": 1e-16, "attention": 3e-3}))
    assert not r.passed and r.metrics["first_bad_layer"] == "block 1 (old block 1)"
    assert r.metrics["first_bad_stage"] == "attention" and r.fix == f"{STAGE_FIX['attention']}; {FIX_FUNCTIONAL}"
    assert "Within it, the attention stage drifts first, by 3.00e-03" in r.message
    assert judge_functional(stats([1e-8, 1e-7, 3e-3, 2e-2]), FunctionalLimits(tolerance=0.1)).passed


def test_judge_fixes_by_place():
    assert judge_functional(stats([2.1, 2.0, 2.0])).fix.startswith(STAGE_FIX["embedding"])
    assert judge_functional(stats([1e-8, 1e-7, 10.9])).fix.startswith(STAGE_FIX["logits"])
    norm = judge_functional(stats([1e-8, 8e-3, 9e-2], {"attention_norm": 6e-2}, ["norm_eps 1e-05 -> 1e-06"]))
    assert norm.fix.startswith("restore norm_eps (norm_eps 1e-05 -> 1e-06)")
    assert "Config fields growth must keep changed: norm_eps 1e-05 -> 1e-06." in norm.message
    assert judge_functional(stats([1e-8, 8e-3, 9e-2], {"ffn_norm": 6e-2})).fix.startswith(FIX_NORM)
    adds_up = judge_functional(stats([1e-8, 2e-5, 9e-5], {"attention": 8e-6, "ffn": 9e-6}))
    assert adds_up.fix == FIX_FUNCTIONAL and "small drifts add up" in adds_up.message


def ffn_norm_interleaved(old, good):
    with torch.no_grad():
        good.blocks[0].ffn_norm.weight.copy_(old.blocks[0].ffn_norm.weight.repeat_interleave(2))
    return good


def up_proj_interleaved(old, good):
    w = old.blocks[0].ffn.up_proj.weight
    with torch.no_grad():
        good.blocks[0].ffn.up_proj.weight.copy_(w.repeat_interleave(2, 0).repeat_interleave(2, 1) / 2)
    return good


def inserted_copied(old, good):
    with torch.no_grad():
        good.blocks[1].attention.o_proj.weight.copy_(good.blocks[0].attention.o_proj.weight)
    return good


CASES = {
    "norm_eps": (lambda old, good: rebuild(replace(good.config, norm_eps=1e-6), good.state_dict()),
                 "block 0 (old block 0)", "attention_norm"),
    "ffn_norm interleaved": (ffn_norm_interleaved, "block 0 (old block 0)", "ffn_norm"),
    "up_proj interleaved": (up_proj_interleaved, "block 0 (old block 0)", "ffn"),
    "rotary pairs permuted": (lambda old, good: permute_qk_pairs(good), "block 0 (old block 0)", "attention"),
    "inserted block copied": (inserted_copied, "block 1 (inserted identity copy of old block 0)", "attention"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_drift_is_located_to_its_stage(case):
    from transfer.simple_growth import scale_bilaterally

    old = source("dense")
    breaker, layer, stage = CASES[case]
    bad = breaker(old, copy.deepcopy(scale_bilaterally(old, 2, 2)))
    r = check_functional_equivalence(old, bad, story_tokens())
    assert not r.passed and r.metrics["first_bad_layer"] == layer
    assert r.metrics["first_bad_stage"] == stage, r.metrics["stage_drift"]
    assert FIX_FUNCTIONAL in r.fix

"""Tests of transfer/checks/results.py: CheckResult's fix and cause fields, the VERIFICATION SUMMARY's fix
list (root causes first, a consequence pointing at the fix that removes it), and the headline figure each check
reports (quantity, value, limit) with its JSON record: on correct growths and on broken ones, value against
limit must agree with the verdict."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.growth_pairs import permute_qk_pairs, rebuild, source, story_tokens, zero_routers
from transfer.checks import detailed_growth_check, upcycling_check
from transfer.checks.divergence import DivergenceLimits, judge_clone_divergence
from transfer.checks.results import FIX_FUNCTIONAL, FIX_NORM, FIX_ROUTER, CheckResult, GrowthReport, norm_fix
from transfer.checks.router import check_router_integrity
from transfer.checks.symmetry import check_symmetry_breaking
from transfer.simple_growth import dense_to_moe, scale_bilaterally

pytestmark = pytest.mark.usefixtures("single_thread")
RECORD_KEYS = {"name", "passed", "message", "quantity", "value", "limit", "higher_is_better", "fix", "consequence_of"}


def test_check_result_prints_its_verdict_and_keeps_fix_out_of_metrics():
    ok = CheckResult("Router integrity", True, "logits match")
    assert str(ok) == "✓ PASSED  Router integrity: logits match" and ok.fix == "" and ok.metrics == {}
    bad = CheckResult("Router integrity", False, "drift", {"router_logit_drift": 3.9}, FIX_ROUTER)
    assert str(bad).startswith("✗ FAILED  Router integrity") and "fix" not in bad.metrics


def test_summary_of_a_passing_report():
    rep = GrowthReport(True, {"rope": CheckResult("RoPE integrity", True, "fine")})
    assert rep.summary().splitlines()[-2:] == ["✓ ALL CHECKS PASSED", "Model is ready for Phase 3 training."]


def test_summary_lists_root_causes_first_and_points_consequences_at_their_fix():
    eps_fix = norm_fix(["norm_eps 1e-05 -> 1e-06"])
    results = {
        "rope": CheckResult("RoPE integrity", False, "m", fix=eps_fix, consequence_of="block 0 (old block 0) attention_norm"),
        "router": CheckResult("Router integrity", False, "m", fix=eps_fix, consequence_of="block 0 (old block 0) ffn_norm"),
        "symmetry": CheckResult("Symmetry breaking", True, "m"),
        "functional": CheckResult("Functional equivalence", False, "m", fix=f"{eps_fix}; {FIX_FUNCTIONAL}"),
    }
    lines = GrowthReport(False, results).summary().splitlines()
    assert lines[-4] == "✗ 3 CHECK(S) FAILED: rope, router, functional. Do not train the grown model; fix:"
    assert lines[-3] == f"  - functional: {eps_fix}; {FIX_FUNCTIONAL}"
    assert lines[-2] == ("  - rope: a consequence of the drift at block 0 (old block 0) attention_norm; "
                         "fixed by the functional fix above")
    assert lines[-1].startswith("  - router: a consequence of the drift at block 0 (old block 0) ffn_norm; fixed by")
    assert FIX_ROUTER not in "\n".join(lines)


def test_summary_gives_a_lone_consequence_its_fix():
    r = CheckResult("RoPE integrity", False, "m", fix=FIX_NORM, consequence_of="block 2 (old block 1) attention_norm")
    assert GrowthReport(False, {"rope": r}).summary().splitlines()[-1] == (
        f"  - rope: a consequence of the drift at block 2 (old block 1) attention_norm; {FIX_NORM}")


def test_norm_fix_names_a_changed_norm_eps():
    assert norm_fix([]) == FIX_NORM
    assert norm_fix(["rope_theta 10000.0 -> 500000.0"]) == FIX_NORM
    assert norm_fix(["norm_eps 1e-05 -> 1e-06"]) == "restore norm_eps (norm_eps 1e-05 -> 1e-06): growth must keep it"


# ------------------------------------------------------------------------------ headline figure and record
def test_within_limit_follows_the_direction():
    assert CheckResult("x", True, "m", value=1e-6, limit=1e-5).within_limit() is True
    assert CheckResult("x", False, "m", value=2e-5, limit=1e-5).within_limit() is False
    assert CheckResult("x", True, "m", value=0.7, limit=0.5, higher_is_better=True).within_limit() is True
    assert CheckResult("x", False, "m", value=0.2, limit=0.5, higher_is_better=True).within_limit() is False
    assert CheckResult("x", False, "m", value=3.0).within_limit() is None  # no limit: nothing to compare


def test_record_is_strict_json_with_plain_floats():
    r = CheckResult("RoPE integrity", False, "drift", {"t": torch.ones(3)}, "fix it", "block 0 attention_norm",
                    quantity="drift", value=torch.tensor(3e-3, dtype=torch.float64), limit=np.float32(1e-5))
    rec = r.to_record()
    assert set(rec) == RECORD_KEYS
    assert type(rec["value"]) is float and type(rec["limit"]) is float  # not a tensor, not numpy
    assert rec["value"] == pytest.approx(3e-3) and rec["limit"] == pytest.approx(1e-5)
    assert rec["consequence_of"] == "block 0 attention_norm" and rec["fix"] == "fix it" and rec["passed"] is False
    assert json.loads(json.dumps(rec, allow_nan=False)) == rec
    for bad in (float("nan"), float("inf"), torch.tensor(float("nan"))):
        assert CheckResult("x", False, "m", value=bad, limit=1.0).to_record()["value"] is None
    assert CheckResult("x", True, "m").to_record()["value"] is None


def assert_headline(r: CheckResult, with_figure: bool = True) -> dict:
    """r's record is strict JSON; with a figure, value and limit are finite floats on the side of the limit the
    verdict says; without one, both are null."""
    rec = json.loads(json.dumps(r.to_record(), allow_nan=False))
    assert set(rec) == RECORD_KEYS and rec["passed"] == r.passed and rec["quantity"], rec
    if with_figure:
        assert isinstance(rec["value"], float) and math.isfinite(rec["value"]), rec
        assert isinstance(rec["limit"], float) and math.isfinite(rec["limit"]), rec
        assert r.within_limit() == r.passed, (r.quantity, r.value, r.limit, r.message)
    else:
        assert rec["value"] is None and rec["limit"] is None and r.within_limit() is None
    return rec


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return story_tokens(4, 64)


@pytest.fixture(scope="module")
def grown_pair():
    old = source("moe")
    return old, scale_bilaterally(old, 2, 2)


def test_every_check_of_a_correct_growth_reports_a_figure_within_its_limit(tokens, grown_pair):
    rep = detailed_growth_check(*grown_pair, tokens, verbose=False)
    assert rep.passed and set(rep.results) == {"rope", "router", "symmetry", "functional", "trainability"}
    for r in rep.results.values():
        assert_headline(r)
    up = upcycling_check(source("dense"), dense_to_moe(source("dense"), 4, 2), tokens, verbose=False)
    assert up.passed and set(up.results) == {"functional", "router", "trainability"}
    for r in up.results.values():
        assert_headline(r)
    assert up.results["router"].higher_is_better  # old model dense: routing judged by balance only


def broken_growths(old, good):
    """(name, check that must fail, broken model, quantity the headline must then name)."""
    head_dim = rebuild(replace(good.config, n_heads=old.config.n_heads, n_kv_heads=old.config.n_kv_heads),
                       good.state_dict())
    router = copy.deepcopy(good)
    with torch.no_grad():
        for b in router.blocks:
            b.ffn.router.weight.mul_(2)
    perturbed = copy.deepcopy(good)
    with torch.no_grad():
        for p in perturbed.blocks[2].parameters():
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
            p.add_(1e-3 * p.detach().pow(2).mean().sqrt() * noise)
    dead = copy.deepcopy(good)
    with torch.no_grad():
        dead.blocks[1].ffn.up_proj[2] = 0  # with its zero down_proj: an expert that never gets gradient
    return [("head_dim grown", "rope", head_dim, "config"),
            ("q/k pairs permuted", "rope", permute_qk_pairs(copy.deepcopy(good)), "attention probabilities"),
            ("router not divided", "router", router, "router-logit drift"),
            ("pure clones", "symmetry", scale_bilaterally(old, 2, 2, noise_std=0.0), "smallest"),
            ("negligible noise", "symmetry", scale_bilaterally(old, 2, 2, noise_std=1e-6), "median"),
            ("perturbed block", "functional", perturbed, "drift"),
            ("dead expert", "trainability", dead, "never receive gradient")]


@pytest.mark.slow
def test_every_check_of_a_broken_growth_reports_a_figure_beyond_its_limit(tokens, grown_pair):
    old, good = grown_pair
    for name, check, bad, quantity in broken_growths(old, good):
        rep = detailed_growth_check(old, bad, tokens, verbose=False)
        r = rep.results[check]
        assert not r.passed, (name, r.message)
        rec = assert_headline(r)
        assert quantity in rec["quantity"], (name, rec["quantity"])
        for other in rep.results.values():  # the other checks, passed or not, stay consistent too
            assert_headline(other)


def test_collapsed_routing_reports_the_entropy_below_its_floor(tokens):
    old = source("dense")
    rep = upcycling_check(old, zero_routers(dense_to_moe(old, 8, 2)), tokens, verbose=False)
    r = rep.results["router"]
    rec = assert_headline(r)
    assert not r.passed and r.higher_is_better and "entropy" in rec["quantity"] and rec["value"] < rec["limit"]


def test_checks_without_a_figure_say_what_they_judged(tokens):
    old = source("dense")
    fewer = source("dense").__class__(replace(old.config, n_layers=1))  # fewer layers: no grown pair
    pair = detailed_growth_check(old, fewer, tokens, verbose=False).results["pair"]
    assert not pair.passed
    assert_headline(pair, with_figure=False)
    same = check_symmetry_breaking(old, tokens, scale_factor=1)  # width unchanged, dense: nothing to compare
    assert same.passed
    assert_headline(same, with_figure=False)


def history(*values: float) -> list[dict]:
    return [{"attention_heads": v, "ffn_neurons": v, "residual": v} for v in values]


@pytest.mark.parametrize("values,passed,quantity", [
    ((1e-8, 2e-4, 1e-3, 3e-3), True, "lowest latest"),
    ((1e-8, 1e-8, 2e-8, 3e-8), False, "lowest latest"),  # stalled below the floor
    ((1e-8, 1e-3, 4e-3, 1e-3), False, "re-locking"),  # fell to a quarter of its maximum
])
def test_divergence_judge_reports_the_figure_it_judged(values, passed, quantity):
    r = judge_clone_divergence(history(*values))
    assert r.passed == passed, r.message
    assert quantity in assert_headline(r)["quantity"]


def test_divergence_judge_gives_no_limit_before_the_floor_applies():
    r = judge_clone_divergence(history(1e-8, 2e-8))  # fewer than min_evals records: no verdict on the floor yet
    assert r.passed and r.value == pytest.approx(2e-8) and r.limit is None
    assert r.to_record()["limit"] is None and DivergenceLimits().min_evals > 2


def test_checks_with_nothing_to_judge_name_that():
    dense = source("dense")
    assert_headline(check_router_integrity(dense, dense, story_tokens(2, 32)), with_figure=False)
    assert_headline(judge_clone_divergence([]), with_figure=False)

"""Tests of transfer/checks/results.py: CheckResult's fix and cause fields, and the VERIFICATION SUMMARY's fix
list (root causes first, a consequence pointing at the fix that removes it)."""
from transfer.checks.results import FIX_FUNCTIONAL, FIX_NORM, FIX_ROUTER, CheckResult, GrowthReport, norm_fix


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

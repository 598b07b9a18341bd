"""The growth checks under the import path users know; they live in transfer/checks/, one module per check.

    report = detailed_growth_check(old_model, new_model, tokens)   # prints VERIFICATION SUMMARY
    report.passed, report.results["trainability"].message, report.results["router"].fix

Every check computes in float64 by default on block copies cast just in time (never a float64 copy of a whole
model), so the models keep their mode, grads, dtype and device.
GROWTH_VERIFICATION.md explains each check, its limits and how to debug a failure.
"""
from transfer.checks import (FIX_COLLAPSE, FIX_FUNCTIONAL, FIX_INSERTED_COLLAPSE, FIX_NORM, FIX_PAIR,
                             FIX_RETRAIN_BALANCE, FIX_ROPE, FIX_ROUTER, FIX_SYMMETRY, FIX_TRAINABILITY, CheckResult,
                             GrowthReport, check_functional_equivalence, check_rope_integrity, check_router_integrity,
                             check_symmetry_breaking, check_trainability, detailed_growth_check, infer_scale_factor,
                             upcycling_check)

__all__ = [
    "CheckResult", "GrowthReport", "FIX_COLLAPSE", "FIX_FUNCTIONAL", "FIX_INSERTED_COLLAPSE", "FIX_NORM", "FIX_PAIR",
    "FIX_RETRAIN_BALANCE", "FIX_ROPE", "FIX_ROUTER", "FIX_SYMMETRY", "FIX_TRAINABILITY",
    "check_functional_equivalence", "check_rope_integrity", "check_router_integrity", "check_symmetry_breaking",
    "check_trainability", "detailed_growth_check", "infer_scale_factor", "upcycling_check",
]

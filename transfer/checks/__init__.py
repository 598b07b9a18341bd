"""The growth checks, one module each, and what they share.

    rope, router, symmetry, functional, trainability   one check each: measure_x(...) -> stats,
                                                       judge_x(stats, limits) -> CheckResult, check_x(...)
    suite          detailed_growth_check (all five, one shared gradient), upcycling_check
    divergence     clone divergence through phase 3 (measure per eval, judge the history)
    pair, objective, results, labels                   the pair, the training objective's gradient (in one graph
                                                       or block by block), CheckResult / GrowthReport / fix
                                                       texts, place names
    stream         a model evaluated in float64 one block at a time while it stays in its own dtype
    clones         which units are copies, found by what they compute (tiled, interleaved or relabelled)
    ownership      weights the optimizer cannot move (frozen, shared, not parameters), read off the model
"""
from transfer.checks.divergence import DivergenceLimits, judge_clone_divergence, measure_clone_divergence
from transfer.checks.functional import FunctionalLimits, check_functional_equivalence
from transfer.checks.results import (FIX_COLLAPSE, FIX_FUNCTIONAL, FIX_INSERTED_COLLAPSE, FIX_NORM, FIX_PAIR,
                                     FIX_RETRAIN_BALANCE, FIX_ROPE, FIX_ROUTER, FIX_SYMMETRY, FIX_TRAINABILITY,
                                     CheckResult, GrowthReport)
from transfer.checks.rope import RopeLimits, check_rope_integrity
from transfer.checks.router import RouterLimits, check_router_integrity
from transfer.checks.suite import detailed_growth_check, upcycling_check
from transfer.checks.symmetry import SymmetryLimits, check_symmetry_breaking, infer_scale_factor
from transfer.checks.trainability import TrainabilityLimits, check_trainability

__all__ = [
    "CheckResult", "GrowthReport", "FIX_COLLAPSE", "FIX_FUNCTIONAL", "FIX_INSERTED_COLLAPSE", "FIX_NORM", "FIX_PAIR",
    "FIX_RETRAIN_BALANCE", "FIX_ROPE", "FIX_ROUTER", "FIX_SYMMETRY", "FIX_TRAINABILITY",
    "check_rope_integrity", "check_router_integrity", "check_symmetry_breaking", "check_functional_equivalence",
    "check_trainability", "detailed_growth_check", "upcycling_check", "infer_scale_factor",
    "RopeLimits", "RouterLimits", "SymmetryLimits", "FunctionalLimits", "TrainabilityLimits",
    "DivergenceLimits", "measure_clone_divergence", "judge_clone_divergence",
]

"""Growth operators (simple_growth), the checks that verify them (checks/, also importable from
verify_growth_mechanics), how a pair grown elsewhere maps onto them (pair_mapping, used by verify_growth.py) and
Hugging Face interop (hf_format)."""
from transfer.simple_growth import dense_to_moe, grown_config, hyperclone_weight, layer_sources, scale_bilaterally
from transfer.checks import (
    CheckResult,
    GrowthReport,
    check_functional_equivalence,
    check_rope_integrity,
    check_router_integrity,
    check_symmetry_breaking,
    check_trainability,
    detailed_growth_check,
    judge_clone_divergence,
    measure_clone_divergence,
    upcycling_check,
)

__all__ = [
    "dense_to_moe", "grown_config", "hyperclone_weight", "layer_sources", "scale_bilaterally",
    "CheckResult", "GrowthReport", "check_functional_equivalence", "check_rope_integrity",
    "check_router_integrity", "check_symmetry_breaking", "check_trainability", "detailed_growth_check",
    "upcycling_check", "measure_clone_divergence", "judge_clone_divergence",
]

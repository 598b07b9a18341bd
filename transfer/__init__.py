"""Growth operators (simple_growth) and the four checks that verify them (verify_growth_mechanics)."""
from transfer.simple_growth import dense_to_moe, grown_config, hyperclone_weight, layer_sources, scale_bilaterally
from transfer.verify_growth_mechanics import (
    CheckResult,
    GrowthReport,
    check_functional_equivalence,
    check_rope_integrity,
    check_router_integrity,
    check_symmetry_breaking,
    detailed_growth_check,
    upcycling_check,
)

__all__ = [
    "dense_to_moe", "grown_config", "hyperclone_weight", "layer_sources", "scale_bilaterally",
    "CheckResult", "GrowthReport", "check_functional_equivalence", "check_rope_integrity",
    "check_router_integrity", "check_symmetry_breaking", "detailed_growth_check", "upcycling_check",
]

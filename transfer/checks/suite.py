"""A transition's whole verification: the pair validated once, each block cast to float64 just in time (never a
whole model: transfer.checks.stream), one gradient of the training objective read by the symmetry and
trainability checks as it is computed, and the VERIFICATION SUMMARY."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from config import TrainConfig
from transfer.checks import stream
from transfer.checks.functional import FunctionalLimits, judge_functional, measure_functional
from transfer.checks.objective import ObjectiveGradients, objective_gradients
from transfer.checks.pair import ModelPair, rejected_pair, require_tokens
from transfer.checks.results import GrowthReport
from transfer.checks.rope import RopeLimits, judge_rope, measure_rope
from transfer.checks.router import RouterLimits, judge_router, measure_router
from transfer.checks.symmetry import SymmetryLimits, SymmetryMeter, scale_problem, symmetry_result
from transfer.checks.trainability import (DEFAULT_STEP_LR, FirstGradient, TrainabilityLimits, TrainabilityStats,
                                          judge_trainability, keeps_block_gradients, mark_inherited,
                                          measure_trainability)

GRADIENT_SEQUENCES = 4  # rows of the batch the gradient checks use: enough to reach every expert, cheap



@stream.reusing_blocks
def detailed_growth_check(old_model: nn.Module, new_model: nn.Module, tokens: Tensor, tolerance: float = 1e-5,
                          min_relative_difference: float = 1e-3, dtype: torch.dtype = torch.float64,
                          verbose: bool = True, train_config: TrainConfig | None = None,
                          layout: list[tuple[int, bool]] | None = None, lr: float | None = None) -> GrowthReport:
    """All five checks (rope, router, symmetry, functional, trainability) in float64, block by block; prints the
    VERIFICATION SUMMARY block. train_config gives the objective's balance/z coefficients; lr the trainability
    check's step, the grown model's first learning rate (the pipeline passes its stage's lr / warmup_steps; default
    DEFAULT_STEP_LR); layout which old block each new block copies (default: the project's, layer_sources). A pair
    that is no grown pair gets one result, "pair"."""
    require_tokens(tokens, min_len=16, why="RoPE breaks are invisible on short sequences")
    rejected = rejected_pair("Grown pair", old_model, new_model)
    if rejected:
        return _report({"pair": rejected}, verbose)
    tc = train_config or TrainConfig()
    # The outputs are compared on the objective's inputs (tokens[:, :-1]), so that the gradient's forward serves
    # as the new model's forward on its rows.
    pair = ModelPair(old_model, new_model, tokens[:, :-1], dtype, layout)
    batch, new = tokens[:GRADIENT_SEQUENCES].to(pair.tokens.device), pair.models["new"]
    symmetry = SymmetryMeter(new, pair.s, dtype) if not scale_problem(new, pair.s) else None
    first = FirstGradient(new, batch, keeps_block_gradients(new, dtype))
    # One gradient of the objective, block by block, read by both checks as it comes and dropped.
    gradients = objective_gradients(new, batch, tc, block_io=True, dtype=dtype, details=True,
                                    consume=lambda n, g: (first(n, g), symmetry and symmetry(n, g)))
    pair.share_new(gradients.details)
    gradients.details = None
    results = {"rope": judge_rope(measure_rope(pair, tolerance), RopeLimits(tolerance)),
               "router": judge_router(measure_router(pair, tolerance), RouterLimits(tolerance))}
    trainability = _trainability(pair, batch, tc, DEFAULT_STEP_LR if lr is None else lr, gradients, first)
    stats = symmetry.finish(gradients.ce, trainability.later_grads) if symmetry else None
    results["symmetry"] = symmetry_result(new, None, pair.s, SymmetryLimits(min_relative_difference), stats=stats)
    results["functional"] = judge_functional(measure_functional(pair, tolerance), FunctionalLimits(tolerance))
    results["trainability"] = judge_trainability(trainability, TrainabilityLimits())
    return _report(results, verbose)


@stream.reusing_blocks
def upcycling_check(dense_model: nn.Module, moe_model: nn.Module, tokens: Tensor, tolerance: float = 1e-5,
                    verbose: bool = True, train_config: TrainConfig | None = None,
                    layout: list[tuple[int, bool]] | None = None, lr: float | None = None) -> GrowthReport:
    """Dense -> MoE: functional equivalence, routing health and trainability (RoPE and symmetry have nothing to
    compare); the trainability check steps at lr, the MoE's first learning rate (default DEFAULT_STEP_LR)."""
    require_tokens(tokens, min_len=2)
    rejected = rejected_pair("Grown pair", dense_model, moe_model)
    if rejected:
        return _report({"pair": rejected}, verbose, upcycling=True)
    tc = train_config or TrainConfig()
    pair = ModelPair(dense_model, moe_model, tokens, torch.float64, layout)
    results = {"functional": judge_functional(measure_functional(pair, tolerance), FunctionalLimits(tolerance)),
               "router": judge_router(measure_router(pair, tolerance), RouterLimits(tolerance))}
    stats = _trainability(pair, pair.tokens[:GRADIENT_SEQUENCES], tc, DEFAULT_STEP_LR if lr is None else lr)
    results["trainability"] = judge_trainability(stats, TrainabilityLimits())
    return _report(results, verbose, upcycling=True)


def _trainability(pair: ModelPair, batch: Tensor, tc: TrainConfig, lr: float,
                  first: ObjectiveGradients | None = None, meter: FirstGradient | None = None) -> TrainabilityStats:
    """The grown model's trainability; where it finds dead units, the source model's too, so that what growth
    inherited is told apart from what it caused (costs nothing when nothing is dead)."""
    new, old = pair.models["new"], pair.models["old"]
    stats = measure_trainability(new, batch, tc, lr=lr, layout=pair.layout, first=first, ownership=pair.ownership,
                                 dtype=pair.dtype, meter=meter)
    if stats.dead:
        mark_inherited(stats, old, measure_trainability(old, batch, tc, lr=lr, dtype=pair.dtype), pair.layout)
    return stats


def _report(results: dict, verbose: bool, upcycling: bool = False) -> GrowthReport:
    report = GrowthReport(all(r.passed for r in results.values()), results)
    if verbose and upcycling:
        print("\n".join(str(r) for r in results.values()))
        print("✓ PASSED — functional equivalence confirmed" if report.passed else "✗ FAILED — see the messages above")
    elif verbose:
        print(report.summary())
    return report

"""The stage table: the pipeline's stages in order, how each grows from the one before and which checks guard
the transition into it. It imports nothing from training/, so the plan, the pipeline and the benchmarks all read
the one table.

    PIPELINE = (dense, moe, grown)       # Stage: name, titles, grow(old, settings, calibration), check, ...
    stage_configs(settings)              # every stage's ModelConfig, each grown from the one before (no model built)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from config import ModelConfig  # Settings in annotations is training.settings.Settings, never imported here
from transfer import (GrowthReport, dense_to_moe, detailed_growth_check, grown_config, measure_clone_divergence,
                      scale_bilaterally, upcycling_check)


@dataclass(frozen=True)
class Stage:
    name: str  # checkpoint prefix, metrics `phase`, and the TrainConfig fields <name>_steps / <name>_lr
    title: str  # phase header
    label: str  # short name in the summary and the plots
    grow: Callable[[nn.Module, Settings, torch.Tensor], nn.Module] | None = None  # previous model -> this one
    check: Callable[..., GrowthReport] | None = None  # check(old, new, calibration, train_config=, lr=) -> report
    describe: Callable[[Settings], str] | None = None  # the transition's title
    config: Callable[[ModelConfig, Settings], ModelConfig] | None = None  # previous config -> this one's (sizes)
    transition: str = ""  # the transition's short name on the loss plot
    measure_clones: Callable[[nn.Module, Settings], dict] | None = None  # clone divergence, at every eval


def _upcycle(model: nn.Module, s: Settings, calibration: torch.Tensor) -> nn.Module:
    g = s.growth
    return dense_to_moe(model, g.n_experts, g.top_k, s.run.seed, g.router_init_std, calibration_tokens=calibration)


def _grow_bilaterally(model: nn.Module, s: Settings, calibration: torch.Tensor) -> nn.Module:
    g = s.growth
    return scale_bilaterally(model, g.scale_factor, g.extra_layers, g.noise_std, s.run.seed,
                             calibration_tokens=calibration)


PIPELINE: tuple[Stage, ...] = (
    Stage("dense", "Phase 1: dense", "Phase 1: dense"),
    Stage("moe", "Phase 2: MoE (upcycled)", "Phase 2: MoE", _upcycle, upcycling_check,
          lambda s: f"dense -> MoE ({s.growth.n_experts} experts, top-{s.growth.top_k})",
          lambda c, s: replace(c, n_experts=s.growth.n_experts, top_k=s.growth.top_k), "dense → MoE"),
    Stage("grown", "Phase 3: grown MoE", "Phase 3: grown MoE", _grow_bilaterally, detailed_growth_check,
          lambda s: (f"bilateral growth (width x{s.growth.scale_factor}, +{s.growth.extra_layers} layers, "
                     f"noise_std {s.growth.noise_std})"),
          lambda c, s: grown_config(c, s.growth.scale_factor, s.growth.extra_layers), "bilateral growth",
          lambda model, s: measure_clone_divergence(model, s.growth.scale_factor)),
)


def stage_index(name: str) -> int:
    return [st.name for st in PIPELINE].index(name)


def stage_configs(s: Settings) -> list[ModelConfig]:
    """The model config of every stage, each grown from the one before (no model is built)."""
    configs = [s.model]
    for stage in PIPELINE[1:]:
        configs.append(stage.config(configs[-1], s))
    return configs

"""A transition: the previous stage's trained model grown into the next stage's and the pair verified on rank 0
(a sharded model gathered whole to rank 0 first and the grown one sharded from it), and its metrics record.
The checks stream the pair block by block in float64 (transfer.checks.stream), so verifying adds a bounded
amount beside the two fp32 models (training.plan.check_estimate), never a float64 copy of a large model."""
from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from training.loop import TrainingState
from training.reporting.metrics import BAR
from training.run_data import Data
from training.parallel.runtime import Runtime
from training.settings import Settings
from training.parallel.sharding import full_model, is_sharded, sharded_from
from training.stages import Stage, stage_index
from transfer.checks.trainability import first_step_lr


@dataclass
class TransitionResult:
    model: nn.Module
    passed: bool  # the same on every rank
    failed: list[str]  # names of the failed checks (rank 0)
    results: dict | None = None  # check name -> CheckResult (rank 0)
    title: str = ""


def transition(stage: Stage, model: nn.Module, data: Data, s: Settings, rt: Runtime) -> TransitionResult:
    """Grow the previous stage's model into stage's and verify the pair on rank 0. A sharded model is gathered whole
    to rank 0, grown and checked there, and the grown model sharded from it on every rank."""
    calib = data.calibration.to(rt.device)
    sharded = is_sharded(model)
    raw = full_model(model, rt) if sharded else model.to(rt.device)
    new = stage.grow(raw, s, calib) if raw is not None else None  # rank 0 alone when sharded
    passed, failed, results = True, [], None
    if rt.is_master:
        print(f"\n{BAR}\nTRANSITION {stage_index(stage.name)}: {stage.describe(s)}\n{BAR}")
        report = stage.check(raw, new, calib, train_config=s.train, lr=check_lr(stage, s))
        passed, failed, results = report.passed, [k for k, r in report.results.items() if not r.passed], report.results
    passed = rt.broadcast_flag(passed)
    if sharded:
        del raw
        new = sharded_from(new, rt) if passed else model
    return TransitionResult(new, passed, failed, results, stage.describe(s))


def check_lr(stage: Stage, s: Settings) -> float:
    """The learning rate of the grown model's first step, where the trainability check steps: the stage's peak lr
    through warm-up step 1 (training.loop.lr_at), as the run will train it."""
    return first_step_lr(getattr(s.train, f"{stage.name}_lr"), s.train)


def transition_record(stage: Stage, result: TransitionResult, state: TrainingState, loss_before: float | None,
                      loss_after: float | None, s: Settings) -> dict:
    """The metrics record of a transition: every check's verdict, the step and objective the checks used (the
    run's), and the eval loss on either side."""
    checks = {k: r.to_record() for k, r in result.results.items()} if result.results else {}
    used = dict(lr=check_lr(stage, s), balance_coef=s.train.balance_coef, z_coef=s.train.z_coef)
    return dict(kind="transition", index=stage_index(stage.name), stage=stage.name, title=result.title,
                global_step=state.global_step, time=time.time(), **state.progress(None), passed=result.passed,
                loss_before=loss_before, loss_after=loss_after, checks=checks, checks_used=used)

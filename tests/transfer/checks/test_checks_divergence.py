"""Tests of clone divergence (transfer/checks/divergence.py): the measurement on freshly grown models (noise
0.3 and 0), through a few training steps (noisy clones move apart, pure clones stay exactly together), on
wrapped and bf16 models; the judge on synthetic histories.

    python -m pytest tests/transfer/checks/test_checks_divergence.py -q
"""
from __future__ import annotations

import copy

import pytest
import torch

from config import TrainConfig
from tests.conftest import tokens_for
from tests.growth_pairs import source
from training.loop import lm_loss, make_optimizer
from transfer.checks.divergence import (KINDS, RAW_KINDS, DivergenceLimits, judge_clone_divergence,
                                        measure_clone_divergence)
from transfer.simple_growth import scale_bilaterally


pytestmark = pytest.mark.usefixtures("single_thread")


def train(model, steps: int, lr: float = 3e-4) -> None:
    """The pipeline's objective and optimizer on fresh real batches."""
    tc = TrainConfig()
    opt = make_optimizer(model, lr, tc)
    for step in range(steps):
        t = tokens_for(4, 65, offset=step * 300)
        lm_loss(model, t[:, :-1], t[:, 1:], tc)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ measurement
@pytest.mark.parametrize("kind,s", [("dense", 2), ("moe", 3), ("mqa", 2), ("dense_untied", 4)])
def test_freshly_grown_clones_compute_the_same_and_differ_only_by_the_noise(kind, s):
    old = source(kind)
    noisy = measure_clone_divergence(scale_bilaterally(old, s, 2, noise_std=0.3), s)
    assert set(noisy) == set(KINDS) | set(RAW_KINDS) | {"min"}
    for k in KINDS:  # the noise sums to zero over input copies: only fp32 rounding of the stored weights
        assert noisy[k] < 1e-6, (k, noisy)
    for k in RAW_KINDS:  # per-row noise 0.3 of the block RMS: ~0.3 * sqrt(2) / sqrt(1.09)
        assert 0.3 < noisy[k] < 0.5, (k, noisy)
    assert noisy["min"] == min(noisy[k] for k in KINDS)
    pure = measure_clone_divergence(scale_bilaterally(old, s, 2, noise_std=0.0), s)
    assert all(v == 0.0 for v in pure.values()), pure


@pytest.mark.slow
def test_noisy_clones_move_apart_in_training_and_pure_clones_never_do():
    old = source("moe")
    noisy, pure = scale_bilaterally(old, 2, 1), scale_bilaterally(old, 2, 1, noise_std=0.0)
    history = {"noisy": [measure_clone_divergence(noisy, 2)], "pure": [measure_clone_divergence(pure, 2)]}
    for _ in range(3):
        train(noisy, 4)
        train(pure, 4)
        history["noisy"].append(measure_clone_divergence(noisy, 2))
        history["pure"].append(measure_clone_divergence(pure, 2))
    for k in KINDS:
        values = [r[k] for r in history["noisy"]]
        assert values == sorted(values) and values[-1] > 1e-3, (k, values)  # rising, 10x past the default floor
        assert all(r[k] == 0.0 for r in history["pure"]), k  # identical gradients, identical updates, forever
    assert judge_clone_divergence(history["noisy"]).passed
    verdict = judge_clone_divergence(history["pure"])
    assert not verdict.passed and "have not diverged" in verdict.message


def test_measurement_reads_wrapped_and_bf16_models_in_place():
    new = scale_bilaterally(source("dense"), 2, 1)
    train(new, 3)
    reference = measure_clone_divergence(new, 2)

    class Wrapper(torch.nn.Module):  # what DDP (.module) and torch.compile (._orig_mod) look like
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    wrapped = Wrapper(Wrapper(new))
    assert measure_clone_divergence(wrapped, 2) == reference
    before = {k: v.clone() for k, v in new.state_dict().items()}
    bf16 = measure_clone_divergence(copy.deepcopy(new).to(torch.bfloat16), 2)
    for k in KINDS:  # bf16 storage rounds each weight to 2^-9: the figure moves by about that, not more
        assert bf16[k] == pytest.approx(reference[k], rel=0.5, abs=1e-2), (k, bf16, reference)
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert all(p.grad is None for p in new.parameters())


def test_no_clones_without_width_growth():
    assert measure_clone_divergence(source("dense"), 1) == {}
    assert judge_clone_divergence([{}, {}]).passed


# ---------------------------------------------------------------------------------- the judge, synthetic
def record(heads: float, ffn: float, residual: float) -> dict[str, float]:
    return {"attention_heads": heads, "ffn_neurons": ffn, "residual": residual,
            "min": min(heads, ffn, residual), "attention_heads_raw": 0.4, "step": 100}


def test_judge_passes_clones_that_keep_diverging():
    history = [record(1e-8, 1e-8, 1e-8), record(0.006, 0.017, 0.009), record(0.012, 0.029, 0.015)]
    v = judge_clone_divergence(history)
    assert v.passed and v.metrics["evals"] == 3 and v.metrics["latest"]["ffn_neurons"] == 0.029
    assert "ffn_neurons 0.029 (max 0.029)" in v.message


def test_judge_waits_min_evals_before_the_floor_rule():
    early = [record(1e-8, 1e-8, 1e-8), record(3e-5, 3e-4, 1e-4)]
    assert judge_clone_divergence(early).passed  # too early to say
    v = judge_clone_divergence(early + [record(5e-5, 2e-3, 2e-3)])
    assert not v.passed and "attention_heads 5.00e-05 after 3 evals (floor 1e-04)" in v.message
    assert "raise noise_std" in v.fix
    assert judge_clone_divergence(early + [record(5e-5, 2e-3, 2e-3)], DivergenceLimits(floor=1e-5)).passed


def test_judge_warns_when_a_kind_relocks():
    rising = [record(1e-8, 1e-8, 1e-8), record(0.01, 0.02, 0.01), record(0.02, 0.04, 0.02)]
    v = judge_clone_divergence(rising + [record(0.018, 0.015, 0.02)])
    assert not v.passed and "re-locking" in v.message
    assert "ffn_neurons fell to 0.015 from its maximum 0.04 (limit 0.5 x maximum)" in v.message
    assert "weight decay" in v.fix and v.metrics["peak"]["ffn_neurons"] == 0.04
    assert judge_clone_divergence(rising + [record(0.018, 0.025, 0.02)]).passed  # a dip above half the peak
    assert judge_clone_divergence(rising + [record(0.018, 0.015, 0.02)], DivergenceLimits(relock_fraction=0.3)).passed


def test_judge_reads_only_the_functional_kinds():
    history = [record(0.01, 0.01, 0.01) | {"attention_heads_raw": r} for r in (0.42, 0.2, 0.05)]
    assert judge_clone_divergence(history).passed  # the raw figure falls in ordinary training


def test_judge_with_no_history():
    assert judge_clone_divergence([]).passed

"""Tests of transfer/checks/symmetry.py's judge on hand-made stats (no models), that the check, sharing the
pair's model, leaves no gradient or requires_grad change behind for the checks after it, and that its in-place
search for identical experts finds what comparing every pair finds."""
import pytest
import torch

from config import TrainConfig
from tests.growth_pairs import source, story_tokens
from transfer.checks.functional import judge_functional, measure_functional
from transfer.checks.objective import objective_gradients
from transfer.checks.pair import ModelPair
from transfer.checks.results import FIX_COLLAPSE, FIX_SYMMETRY
from transfer.checks.symmetry import SymmetryLimits, SymmetryStats, judge_symmetry, measure_symmetry
from transfer.simple_growth import scale_bilaterally

EPS = torch.finfo(torch.float64).eps


def stats(families=(), expert_pairs=(), untested=0, s=2):
    fams = [(label, torch.tensor(v, dtype=torch.float64)) for label, v in families]
    return SymmetryStats(s, EPS, fams, untested, list(expert_pairs), 5.1)


def test_judge_passes_noisy_clones():
    r = judge_symmetry(stats([("residual dims (embedding columns)", [0.2, 0.3, 0.1]), ("block 0 q-heads", [0.25])], untested=7))
    assert r.passed and r.metrics["pairs_tested"] == 4 and r.metrics["median_relative_difference"] == 0.2
    assert "7 pairs received no gradient" in r.message


def test_judge_fails_identical_pairs_naming_the_first_family():
    r = judge_symmetry(stats([("residual dims (embedding columns)", [0.2]), ("block 1 FFN neurons", [0.3, 0.0])]))
    assert not r.passed and r.fix == FIX_SYMMETRY and r.metrics["pairs_identical"] == 1
    assert "first in block 1 FFN neurons" in r.message and "below 2e-13" in r.message


def test_judge_fails_weak_noise_on_the_median():
    r = judge_symmetry(stats([("f", [1e-6, 2e-6, 3e-6, 0.5])]))
    assert not r.passed and "median 2.0e-06 relative (limit >= 1e-03)" in r.message
    assert judge_symmetry(stats([("f", [1e-6, 2e-6, 3e-6, 0.5])]), SymmetryLimits(min_relative_difference=1e-6)).passed


def test_judge_identical_experts_fed_the_same_tokens_point_at_the_router():
    r = judge_symmetry(stats(expert_pairs=[("block 0 experts 1 and 2", 0.0), ("block 0 experts 1 and 3", 0.4)], s=1))
    assert not r.passed and r.fix == FIX_COLLAPSE and "block 0 experts 1 and 2" in r.message


def test_judge_nothing_reached_when_width_grew():
    assert not judge_symmetry(stats(untested=12)).passed
    assert judge_symmetry(SymmetryStats(1, EPS, has_clones=False)).passed


def test_symmetry_on_a_shared_pair_leaves_nothing_behind():
    old = source("moe")
    t = story_tokens()
    pair = ModelPair(old, scale_bilaterally(old, 2, 1), t, torch.float64)
    flags = {n: p.requires_grad for n, p in pair.new.named_parameters()}
    before = judge_functional(measure_functional(pair))
    r = judge_symmetry(measure_symmetry(pair.new, objective_gradients(pair.new, t, TrainConfig()), 2))
    assert r.passed
    assert {n: p.requires_grad for n, p in pair.new.named_parameters()} == flags
    assert all(p.grad is None for p in pair.new.parameters())
    after = judge_functional(measure_functional(pair))
    assert after.metrics["layer_drift"] == before.metrics["layer_drift"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_identical_experts_are_found_in_place_exactly_as_by_comparing_every_pair(dtype):
    """The in-place search (values at fixed places, then torch.equal against each class's first) finds exactly the
    pairs a comparison of every pair finds: classes of equal experts, one element changed off the probes, NaN."""
    from types import SimpleNamespace

    from transfer.checks.symmetry import _identical_experts

    def every_pair(f):
        w = [t.flatten(1) for t in (f.gate_proj, f.up_proj, f.down_proj)]
        n = len(w[0])
        return [(a, b) for a in range(n) for b in range(a + 1, n) if all(torch.equal(x[a], x[b]) for x in w)]

    gen = torch.Generator().manual_seed(0)
    found_any = False
    for trial in range(24):
        base = torch.randn(3, 4, 5, 7, generator=gen).to(dtype)
        which = torch.randint(0, 4, (8,), generator=gen)
        gate, up = base[0][which].clone(), base[1][which].clone()
        down = base[2][which].clone().transpose(1, 2).contiguous()
        if trial % 3 == 0:
            gate[1, 2, 3] += 1  # off the probed places: only the whole comparison tells
        if trial % 5 == 0:
            up[2] = float("nan")  # NaN equals nothing, itself included
        ffn = SimpleNamespace(gate_proj=gate, up_proj=up, down_proj=down)
        got = _identical_experts(SimpleNamespace(ffn=ffn))
        assert got == every_pair(ffn), trial
        found_any = found_any or bool(got)
    assert found_any

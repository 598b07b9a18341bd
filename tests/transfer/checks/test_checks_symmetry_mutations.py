"""The symmetry check against growths whose copies stay twins (zero or negligible noise, copies 1..s identical, one
symmetric neuron pair inside an expert): each fails symmetry alone. The judge: test_checks_symmetry.py."""
import copy

import pytest
import torch

from tests.growth_pairs import (SYMMETRY_FIX, assert_all_pass, assert_caught, first_vs_rest_symmetric_noise, pure_clone,
                                report, source)
from transfer.checks import FIX_SYMMETRY
from transfer.simple_growth import scale_bilaterally


# ---------------------------------------------------------------------- mutations: symmetry check
@pytest.mark.slow
@pytest.mark.parametrize("kind,s,extra", [("dense", 2, 2), ("moe", 3, 1), ("upcycled", 2, 0), ("gqa", 4, 1)])
def test_zero_noise_fails_symmetry_only(tokens, kind, s, extra):
    old = source(kind)
    good = scale_bilaterally(old, s, extra)
    bad = pure_clone(old, s, extra)
    rep = assert_caught(old, good, bad, tokens, "symmetry", (SYMMETRY_FIX, FIX_SYMMETRY),
                        also_ok=("rope", "router", "functional"))
    m = rep.results["symmetry"].metrics
    assert m["pairs_identical"] > 0 and m["min_relative_difference"] < 1e-10


def test_negligible_noise_fails_symmetry(tokens):
    old = source("dense")
    good = scale_bilaterally(old, 2, 1)
    bad = scale_bilaterally(old, 2, 1, noise_std=1e-6)
    rep = assert_caught(old, good, bad, tokens, "symmetry", (SYMMETRY_FIX,), also_ok=("rope", "functional"))
    assert rep.results["symmetry"].metrics["min_relative_difference"] < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind,s", [("dense", 3), ("moe", 4)])
def test_noise_leaving_copies_1_to_s_identical_fails_symmetry(tokens, kind, s):
    old = source(kind)
    assert_all_pass(report(old, scale_bilaterally(old, s, 1), tokens))
    bad = first_vs_rest_symmetric_noise(old, s, 1)
    rep = report(old, bad, tokens)
    assert rep.results["functional"].passed  # the noise is zero-sum: function preserved (holds today)
    # the defect is real: copies 1 and 2 of every residual dimension get identical gradients
    model = copy.deepcopy(bad).double()
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    ge = model.embed.weight.grad.t().reshape(s, old.config.dim, -1)
    assert ((ge[1] - ge[2]).norm(dim=-1) / ge[1].norm(dim=-1)).max() < 1e-6
    assert not rep.results["symmetry"].passed, rep.results["symmetry"].message
    assert SYMMETRY_FIX in rep.results["symmetry"].message

def test_one_symmetric_neuron_pair_inside_an_expert_is_caught(tokens):
    """A single expert neuron whose two copies are made exact twins (function kept: the twin rows produce the
    same output and the down columns are averaged, so the noise still cancels) must fail symmetry alone."""
    old = source("moe")
    good = scale_bilaterally(old, 2, 1)
    bad = copy.deepcopy(good)
    f0 = old.config.hidden_dim
    with torch.no_grad():
        ffn = bad.blocks[0].ffn
        for w in (ffn.gate_proj, ffn.up_proj):
            w[1, 3 + f0] = w[1, 3]
        mean = (ffn.down_proj[1, :, 3] + ffn.down_proj[1, :, 3 + f0]) / 2
        ffn.down_proj[1, :, 3], ffn.down_proj[1, :, 3 + f0] = mean, mean
    assert_all_pass(report(old, good, tokens))
    rep = report(old, bad, tokens)
    assert rep.results["functional"].passed and not rep.results["symmetry"].passed
    assert rep.results["symmetry"].metrics["pairs_identical"] == 1
    assert "block 0 FFN neurons" in rep.results["symmetry"].message

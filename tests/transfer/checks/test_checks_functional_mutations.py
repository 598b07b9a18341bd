"""The functional check against realistic broken growths (a perturbed block or FFN, noise that does not cancel or sums
over the wrong axis, embedding or LM head scaled wrongly, norm_eps changed, interleaved layout, an inserted block
copied plainly, experts permuted against the router, broken upcycling, corrupted unused embedding rows): each fails
functional, naming where. The judge and drift location: test_checks_functional.py."""
import copy
from dataclasses import replace

import pytest
import torch

from tests.growth_pairs import (FUNCTIONAL_FIX, TOL, add_independent_noise, assert_all_pass, assert_caught, block_rms,
                                gen, moe_pair, pure_clone, rebuild, report, source, zero_sum_over_outputs)
from transfer.checks import FIX_FUNCTIONAL
from transfer.simple_growth import dense_to_moe, scale_bilaterally


# -------------------------------------------------------------------- mutations: functional check
def test_perturbed_block_fails_functional_naming_that_block(tokens):
    old = source("dense")
    good = scale_bilaterally(old, 2, 2)  # layout: old 0, inserted copy of 0, old 1, inserted copy of 1
    bad = copy.deepcopy(good)
    g = gen(11)
    with torch.no_grad():
        for p in bad.blocks[2].parameters():
            p.add_(1e-3 * block_rms(p).float() * torch.randn(p.shape, generator=g))
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX, FIX_FUNCTIONAL))
    m = rep.results["functional"].metrics
    assert m["first_bad_layer"] == "block 2 (old block 1)"
    assert "first departs from the old one's at block 2 (old block 1)" in rep.results["functional"].message
    drifts = m["layer_drift"]
    for earlier in ("embedding", "block 0", "block 1"):
        assert drifts[earlier] < TOL / 20, (earlier, drifts)  # earlier layers unaffected
    assert drifts["block 2"] > TOL and drifts["logits"] > TOL


def test_perturbed_ffn_only_fails_functional_but_not_rope(tokens):
    old = source("gqa")
    good = scale_bilaterally(old, 2, 0)
    bad = copy.deepcopy(good)
    with torch.no_grad():
        bad.blocks[1].ffn.down_proj.weight.mul_(1 + 1e-3)
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,), also_ok=("rope", "symmetry"))
    assert rep.results["functional"].metrics["first_bad_layer"] == "block 1 (old block 1)"


def test_non_cancelling_noise_fails_functional(tokens):
    old = source("dense")
    good = scale_bilaterally(old, 2, 1)
    bad = add_independent_noise(pure_clone(old, 2, 1), 2)
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,))
    assert rep.results["functional"].metrics["first_bad_layer"] == "block 0 (old block 0)"


def test_noise_zero_sum_over_output_copies_fails_functional(tokens):
    old = source("dense")
    good = scale_bilaterally(old, 2, 0)
    bad = zero_sum_over_outputs(pure_clone(old, 2, 0), 2, "blocks.0.ffn.gate_proj.weight")
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,), also_ok=("rope",))
    assert rep.results["functional"].metrics["first_bad_layer"] == "block 0 (old block 0)"


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_divided_by_scale_fails_functional_at_embedding(tokens, tied):
    """tied=True: the LM head kept tied and rescaled in place (W.repeat(1, s) / s), which halves the
    embedding too; tied=False: the embedding divided like an input-widened Linear."""
    old = source("dense")
    good = scale_bilaterally(old, 2, 1)
    if tied:
        state = good.state_dict()
        state["embed.weight"] = state["lm_head.weight"].clone()
        bad = rebuild(replace(good.config, tie_embeddings=True), state)
        assert bad.lm_head.weight is bad.embed.weight
    else:
        bad = copy.deepcopy(good)
        with torch.no_grad():
            bad.embed.weight.div_(2)
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,))
    assert rep.results["functional"].metrics["first_bad_layer"] == "embedding"


def test_lm_head_not_divided_fails_functional_at_logits(tokens):
    old = source("dense_untied")
    good = scale_bilaterally(old, 2, 1)
    bad = copy.deepcopy(good)
    with torch.no_grad():
        bad.lm_head.weight.mul_(2)
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,))
    m = rep.results["functional"].metrics
    assert m["first_bad_layer"] == "logits"
    assert max(d for k, d in m["layer_drift"].items() if k != "logits") < TOL / 20


def test_norm_eps_changed_fails_functional(tokens):
    """Hugging Face's LlamaConfig default rms_norm_eps is 1e-6, this project's 1e-5 (shared/FACTS.md)."""
    old = source("dense")
    good = scale_bilaterally(old, 2, 1)
    bad = rebuild(replace(good.config, norm_eps=1e-6), good.state_dict())
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,))
    assert rep.results["functional"].metrics["first_bad_layer"] == "block 0 (old block 0)"


@pytest.mark.parametrize("target", ["up_proj", "ffn_norm"])
def test_interleaved_instead_of_tiled_layout_fails_functional(tokens, target):
    old = source("dense")
    good = scale_bilaterally(old, 2, 0)
    bad = copy.deepcopy(good)
    with torch.no_grad():
        if target == "up_proj":
            w = old.blocks[0].ffn.up_proj.weight
            bad.blocks[0].ffn.up_proj.weight.copy_(w.repeat_interleave(2, 0).repeat_interleave(2, 1) / 2)
        else:
            bad.blocks[0].ffn_norm.weight.copy_(old.blocks[0].ffn_norm.weight.repeat_interleave(2))
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,))
    assert rep.results["functional"].metrics["first_bad_layer"] == "block 0 (old block 0)"


@pytest.mark.parametrize("kind", ["dense", "upcycled"])
def test_inserted_block_plainly_copied_fails_functional_naming_it(tokens, kind):
    old = source(kind)
    good = scale_bilaterally(old, 2, 2)
    bad = copy.deepcopy(good)
    with torch.no_grad():  # block 1 = inserted copy of old block 0: restore its output projections
        bad.blocks[1].attention.o_proj.weight.copy_(bad.blocks[0].attention.o_proj.weight)
        if kind == "dense":
            bad.blocks[1].ffn.down_proj.weight.copy_(bad.blocks[0].ffn.down_proj.weight)
        else:
            bad.blocks[1].ffn.down_proj.copy_(bad.blocks[0].ffn.down_proj)
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,))
    m = rep.results["functional"].metrics
    assert m["first_bad_layer"] == "block 1 (inserted identity copy of old block 0)"
    assert m["layer_drift"]["block 0"] < TOL / 20


def test_experts_permuted_against_router_fails_functional_not_router(tokens):
    old, good = moe_pair(extra=0)
    bad = copy.deepcopy(good)
    with torch.no_grad():
        f = bad.blocks[0].ffn
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(f, name).copy_(getattr(f, name).roll(1, dims=0))
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,), also_ok=("router", "rope"))
    assert rep.results["functional"].metrics["first_bad_layer"] == "block 0 (old block 0)"


@pytest.mark.parametrize("defect", ["expert_noise", "down_divided_by_top_k"])
def test_broken_upcycling_fails_functional(tokens, defect):
    old = source("dense")
    good = dense_to_moe(old, n_experts=4, top_k=2)
    bad = copy.deepcopy(good)
    with torch.no_grad():
        if defect == "expert_noise":  # experts no longer copies of the dense FFN
            up = bad.blocks[1].ffn.up_proj
            up.add_(0.1 * block_rms(up).float() * torch.randn(up.shape, generator=gen(5)))
        else:  # "top_k experts add up", so someone divides each by k: renormalised weights already sum to 1
            for b in bad.blocks:
                b.ffn.down_proj.div_(2)
    rep = assert_caught(old, good, bad, tokens, "functional", (FUNCTIONAL_FIX,), also_ok=("rope", "router"))
    first = "block 1 (old block 1)" if defect == "expert_noise" else "block 0 (old block 0)"
    assert rep.results["functional"].metrics["first_bad_layer"] == first


def test_corrupted_embedding_rows_of_unused_ids_fail_functional(tokens):
    old = source("dense")
    bad = scale_bilaterally(old, 2, 1)
    assert_all_pass(report(old, bad, tokens))
    with torch.no_grad():
        bad.embed.weight[256:] = torch.randn(bad.embed.weight[256:].shape, generator=gen(9))
    assert int(tokens.max()) < 256
    assert not report(old, bad, tokens).results["functional"].passed

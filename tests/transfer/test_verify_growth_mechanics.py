"""Tests of the growth checks through their facade (transfer/verify_growth_mechanics.py); each check's module
has its own file too (tests/transfer/checks/test_checks_*.py). The models and broken growths several files share
are built in tests/growth_pairs.py.

A check is only as good as the broken growths it rejects, and it must never cry wolf:

    1. no false alarms: correct growth (scale_bilaterally, dense_to_moe) passes all five checks over
       seeds, scale factors 1-4, 0-8 inserted blocks, dense / MoE / upcycled sources, GQA, MQA, tied and
       untied embeddings;
    2. mutations: each realistic broken growth makes the MATCHING check fail with the right fix text, the
       summary shows it, and the unbroken counterpart passes (so no check is trivially always-fail);
    3. contracts: inputs untouched (weights, mode, grads, dtype, requires_grad, global RNG), result fields,
       messages carry measured value and limit, the printed VERIFICATION SUMMARY, argument validation.

Tiny models (vocab 300, dim 32, 2 layers) on byte-encoded children's-story text, CPU, float32 models
(the checks work on float64 copies).

    .venv/bin/python -m pytest tests/transfer/test_verify_growth_mechanics.py -q
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from models.model import rope_tables
from tests.growth_pairs import (dead_expert_router, gen, make_model, moe_pair, permute_qk_pairs, rebuild, source,
                                 story_tokens, zero_routers)
from transfer.simple_growth import dense_to_moe, hyperclone_weight, layer_sources, scale_bilaterally
from transfer.verify_growth_mechanics import (
    FIX_COLLAPSE,
    FIX_FUNCTIONAL,
    FIX_ROPE,
    FIX_ROUTER,
    FIX_SYMMETRY,
    CheckResult,
    GrowthReport,
    check_functional_equivalence,
    check_rope_integrity,
    check_router_integrity,
    check_symmetry_breaking,
    check_trainability,
    detailed_growth_check,
)

# Substrings of the fix texts the brief promises (FIX_* are used too, so a reworded constant still matches).
ROPE_FIX = "heads must scale with width"
ROUTER_FIX = "divide the router's widened input weights by the scale factor"
SYMMETRY_FIX = "raise noise_std"
FUNCTIONAL_FIX = "GROWTH_VERIFICATION.md section 4"
TOL = 1e-5  # the checks' default tolerance

NOISY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------- helpers
def weight_key(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if parts[-1] == "weight" else parts[-1]


def block_rms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().double().pow(2).mean().sqrt()


def report(old, new, tokens) -> GrowthReport:
    return detailed_growth_check(old, new, tokens, verbose=False)


def standalone(check: str, old, new, tokens) -> CheckResult:
    if check == "rope":
        return check_rope_integrity(old, new, tokens)
    if check == "router":
        return check_router_integrity(old, new, tokens)
    if check == "symmetry":
        return check_symmetry_breaking(new, tokens)  # scale factor inferred from the tiled embedding
    return check_functional_equivalence(old, new, tokens)


def assert_all_pass(rep: GrowthReport) -> None:
    assert rep.passed, rep.summary()
    assert all(r.passed for r in rep.results.values()), rep.summary()


def assert_caught(old, good, bad, tokens, check: str, fixes: tuple[str, ...], also_ok: tuple[str, ...] = ()):
    """The unbroken growth passes everything; the broken one fails `check` (standalone and inside
    detailed_growth_check) with every text of `fixes` in its message; the summary names it; the checks
    in `also_ok` still pass. Returns the detailed report of the broken growth."""
    assert_all_pass(report(old, good, tokens))
    rep = report(old, bad, tokens)
    res = rep.results[check]
    assert not res.passed, f"{check} missed the broken growth: {res.message}"
    for fix in fixes:
        assert fix in res.message, res.message
    assert not rep.passed
    summary = rep.summary()
    assert f"✗ FAILED  {res.name}" in summary
    assert f"  - {check}: " in summary
    assert "ALL CHECKS PASSED" not in summary
    alone = standalone(check, old, bad, tokens)
    assert not alone.passed, f"standalone {check} disagrees with detailed_growth_check: {alone.message}"
    for other in also_ok:
        assert rep.results[other].passed, f"{other} cried wolf: {rep.results[other].message}"
    return rep


# ----------------------------------------------------------------------------------- broken growths
def pure_clone(old, s, extra):
    return scale_bilaterally(old, s, extra, noise_std=0.0)


def add_independent_noise(model, s, seed=0):
    """Noise drawn independently for each input copy of every noisy weight (0.3 x block RMS / s): it does
    not sum to zero over the copies, so it does not cancel on tiled input."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if weight_key(name) in NOISY:
                eta = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3 * block_rms(p) / s
                p.copy_((p.double() + eta).to(p.dtype))
    return model


def zero_sum_over_outputs(model, s, name, seed=0):
    """Noise that sums to zero over the OUTPUT copies (wrong axis): each output copy gets a non-zero net."""
    p = dict(model.named_parameters())[name]
    with torch.no_grad():
        x = p.detach().double()
        out, in_ = x.shape[-2] // s, x.shape[-1]
        eta = torch.randn(s, out, in_, generator=gen(seed), dtype=torch.float64)
        eta = (eta - eta.mean(0, keepdim=True)) * 0.3 * block_rms(p) / s
        p.copy_((x + eta.reshape(x.shape)).to(p.dtype))
    return model


def first_vs_rest_symmetric_noise(old, s, extra, std=0.3, seed=0):
    """The natural s > 2 generalisation of Apple's [W/2 + eta, W/2 - eta]: input copy 0 gets +eta, copies
    1..s-1 each get -eta/(s-1) (zero-sum, so the function is preserved), with eta drawn per block of the
    old weight and tiled over the output copies. Copies 1..s-1 are then exchangeable everywhere: they get
    bit-identical gradients and stay identical through any training."""
    new = pure_clone(old, s, extra)
    g = gen(seed)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if weight_key(name) not in NOISY:
                continue
            x = p.detach().double()
            out, in_ = x.shape[-2] // s, x.shape[-1] // s
            eta = torch.randn(*x.shape[:-2], out, in_, generator=g, dtype=torch.float64) * std * block_rms(p)
            blk = torch.cat([eta] + [-eta / (s - 1)] * (s - 1), dim=-1)  # (..., out, s*in)
            p.copy_((x + blk.repeat(*([1] * (x.dim() - 2)), s, 1)).to(p.dtype))
    return new


def kv_heads_kept(old, s, extra, seed=0):
    """Width growth that multiplies the query heads but keeps the KV heads (k/v widen their input only)."""
    good = scale_bilaterally(old, s, extra, seed=seed)
    cfg = replace(good.config, n_kv_heads=old.config.n_kv_heads)
    state = good.state_dict()
    g = gen(100 + seed)
    for j, (src, _) in enumerate(layer_sources(old.config.n_layers, extra)):
        for proj in ("k_proj", "v_proj"):
            w = getattr(old.blocks[src].attention, proj).weight
            state[f"blocks.{j}.attention.{proj}.weight"] = hyperclone_weight(
                w, s, widen_out=False, widen_in=True, noise_std=0.3, generator=g)
    return rebuild(cfg, state)


# ================================================================== 1. no false alarms on correct growth
# A Latin-square cover: every source kind sees every scale factor, and every (scale, extra) pair occurs.
SCALES, EXTRAS = (1, 2, 3, 4), (0, 1, 4, 8)
GRID = [
    (kind, s, EXTRAS[(i + k) % 4], (i + k) % 3)
    for k, kind in enumerate(["dense", "dense_untied", "gqa", "moe", "upcycled", "moe_gqa_untied_top1"])
    for i, s in enumerate(SCALES)
] + [("mqa", 2, 1, 0), ("mqa", 3, 0, 1), ("wide_dense", 2, 4, 2), ("wide_dense", 3, 1, 0)]
# and the full scale x extra product for the two main sources
GRID += [(kind, s, e, (s + e + k) % 3) for k, kind in enumerate(["dense", "moe"]) for s in SCALES for e in EXTRAS]
GRID = list(dict.fromkeys(GRID))


@pytest.mark.slow
@pytest.mark.parametrize("kind,s,extra,seed", GRID, ids=[f"{k}-s{s}-x{e}-seed{r}" for k, s, e, r in GRID])
def test_correct_bilateral_growth_passes_all_checks(tokens, kind, s, extra, seed):
    old = source(kind, seed)
    new = scale_bilaterally(old, scale_factor=s, extra_layers=extra, seed=seed)
    rep = report(old, new, tokens)
    assert_all_pass(rep)
    assert set(rep.results) == {"rope", "router", "symmetry", "functional", "trainability"}
    # Correct growth sits orders of magnitude below the tolerance, not just under it.
    assert rep.results["functional"].metrics["max_drift"] < TOL / 20
    assert rep.results["functional"].metrics["first_bad_layer"] is None
    if new.config.is_moe and old.config.is_moe:
        m = rep.results["router"].metrics
        assert m["router_logit_drift"] < TOL / 20 and m["topk_disagreements"] == 0
    if s > 1:
        m = rep.results["symmetry"].metrics
        assert m["pairs_tested"] > 0 and m["pairs_identical"] == 0 and m["scale_factor"] == s
    # every reached weight gets gradient; inserted identity blocks need the second step, nothing else does
    m = rep.results["trainability"].metrics
    assert m["dead_weights"] == 0 and m["alive_after_step"][-1] == m["judged_weights"]
    assert (m["alive_after_step"][0] < m["judged_weights"]) == (extra > 0) and m["steps"] == 1 + (extra > 0)
    assert m["weakest_unit_gradient"] > 1e-8  # five orders above the zero line (2.2e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_experts,top_k,kv", [(8, 2, None), (4, 1, 2), (4, 4, None)])
def test_correct_dense_to_moe_passes_all_checks(tokens, seed, n_experts, top_k, kv):
    old = make_model(seed, n_kv_heads=kv)
    new = dense_to_moe(old, n_experts=n_experts, top_k=top_k, seed=seed)
    rep = report(old, new, tokens)
    assert_all_pass(rep)
    assert rep.results["functional"].metrics["max_drift"] < TOL / 20
    assert rep.results["router"].metrics["max_dead_experts"] == 0
    # identical experts, told apart by the router: the symmetry check actually compared them
    assert rep.results["symmetry"].metrics["pairs_tested"] > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_composite_growth_dense_to_wide_moe_passes(tokens, seed):
    """Phase 1 -> phase 3 in one comparison: dense -> upcycled MoE -> width x2 + 2 identity blocks."""
    old = make_model(seed, tie_embeddings=seed % 2 == 0)
    new = scale_bilaterally(dense_to_moe(old, 8, 2, seed=seed), 2, 2, seed=seed)
    assert_all_pass(report(old, new, tokens))


@pytest.mark.parametrize("seed", [0, 1])
def test_correct_growth_with_calibrated_routers_passes(tokens, seed):
    """Routers centred on real hidden states (calibration_tokens, where the growth operators offer it)
    are still correct growth: identical experts / identity blocks make any router function-preserving."""
    import inspect
    for fn in (dense_to_moe, scale_bilaterally):
        if "calibration_tokens" not in inspect.signature(fn).parameters:
            pytest.skip(f"{fn.__name__} has no calibration_tokens")
    old = make_model(seed)
    moe = dense_to_moe(old, 8, 2, seed=seed, calibration_tokens=tokens)
    assert_all_pass(report(old, moe, tokens))
    assert_all_pass(report(moe, scale_bilaterally(moe, 2, 2, seed=seed, calibration_tokens=tokens), tokens))


def test_standalone_checks_agree_with_detailed_on_correct_growth(tokens):
    old = source("moe", 1)
    new = scale_bilaterally(old, 3, 4, seed=1)
    for check in ("rope", "router", "symmetry", "functional"):
        res = standalone(check, old, new, tokens)
        assert res.passed, res.message
    assert check_symmetry_breaking(new, tokens).metrics["scale_factor"] == 3  # inferred from the embedding


# ========================================================================= 2. mutations: RoPE check
@pytest.mark.parametrize("kind", ["dense", "gqa"])
def test_head_dim_changed_instead_of_heads_fails_rope(tokens, kind):
    old = source(kind)
    good = scale_bilaterally(old, 2, 1)
    # Same weights (the shapes match), but the width went into head_dim: heads unchanged, head_dim x2.
    bad = rebuild(replace(good.config, n_heads=old.config.n_heads, n_kv_heads=old.config.n_kv_heads),
                  good.state_dict())
    rep = assert_caught(old, good, bad, tokens, "rope", (ROPE_FIX, FIX_ROPE))
    res = rep.results["rope"]
    assert "head_dim changed from 8 to 16" in res.message
    assert res.metrics["new_head_dim"] == 16 and res.metrics["new_n_heads"] == old.config.n_heads


def test_rope_theta_changed_fails_rope(tokens):
    old = source("dense")
    good = scale_bilaterally(old, 2, 1)
    bad = rebuild(replace(good.config, rope_theta=500000.0), good.state_dict())
    rep = assert_caught(old, good, bad, tokens, "rope", (ROPE_FIX,))
    assert "rope_theta changed from 10000.0 to 500000.0" in rep.results["rope"].message


def test_rope_tables_rescaled_with_config_unchanged_fails_rope(tokens):
    """NTK-style rescaled cos/sin buffers while the config still says theta=10000."""
    old = source("dense")
    good = scale_bilaterally(old, 2, 1)
    bad = copy.deepcopy(good)
    cos, sin = rope_tables(bad.config.head_dim, bad.config.max_seq_len, bad.config.rope_theta * 8)
    bad.rope_cos.copy_(cos)
    bad.rope_sin.copy_(sin)
    rep = assert_caught(old, good, bad, tokens, "rope", (ROPE_FIX,))
    m = rep.results["rope"].metrics
    assert m["rope_table_drift"] > TOL
    assert f"RoPE cos/sin tables differ by {m['rope_table_drift']:.2e} (limit 1e-05)" in rep.results["rope"].message


def test_qk_rotary_pairing_permuted_fails_rope_and_functional(tokens):
    old = source("dense")
    good = scale_bilaterally(old, 2, 2)
    bad = permute_qk_pairs(copy.deepcopy(good))
    rep = assert_caught(old, good, bad, tokens, "rope", (ROPE_FIX,))
    assert rep.results["rope"].metrics["max_attention_prob_drift"] > TOL
    assert not rep.results["functional"].passed


def test_gqa_kv_heads_not_scaled_fails_rope_and_functional(tokens):
    old = source("gqa")  # 4 query heads, 2 KV heads: not scaling the KV heads regroups queries
    good = scale_bilaterally(old, 2, 1)
    bad = kv_heads_kept(old, 2, 1)
    rep = assert_caught(old, good, bad, tokens, "rope", (ROPE_FIX,))
    assert "4/2 (q/kv) -> 8/2" in rep.results["rope"].message and "expected 8/4" in rep.results["rope"].message
    assert not rep.results["functional"].passed


def test_gqa_kv_heads_interleaved_instead_of_tiled_fails_rope(tokens):
    """KV heads grown with repeat_interleave (kv head k*s + c = old k, the layout GQA expansion uses) while
    query heads are tiled (head j + H*c = old j): cloned query heads read the wrong KV heads."""
    old = source("gqa")
    good = scale_bilaterally(old, 2, 0)
    bad = copy.deepcopy(good)
    hd = old.config.head_dim
    with torch.no_grad():
        for ob, nb in zip(old.blocks, bad.blocks):
            for proj in ("k_proj", "v_proj"):
                w = getattr(ob.attention, proj).weight.repeat(1, 2) / 2  # (K*hd, 2D): input widened
                w = w.view(-1, hd, w.shape[-1]).repeat_interleave(2, dim=0).reshape(-1, w.shape[-1])
                getattr(nb.attention, proj).weight.copy_(w)
    rep = assert_caught(old, good, bad, tokens, "rope", (ROPE_FIX,))
    assert rep.results["rope"].metrics["max_attention_prob_drift"] > TOL
    assert not rep.results["functional"].passed


def test_shrunk_max_seq_len_fails_rope(tokens):
    old = source("dense")
    good = scale_bilaterally(old, 2, 1)
    bad = rebuild(replace(good.config, max_seq_len=32), good.state_dict())
    assert check_rope_integrity(old, good).passed
    assert not check_rope_integrity(old, bad).passed


def test_mqa_growth_keeping_single_kv_head_is_not_a_false_alarm(tokens):
    old = source("mqa")
    new = kv_heads_kept(old, 2, 1)
    rep = report(old, new, tokens)
    assert rep.results["functional"].passed  # it IS the same function (this part holds today)
    assert_all_pass(rep)


# ======================================================================= 2. mutations: router check
@pytest.mark.slow
@pytest.mark.parametrize("s", [2, 3])
def test_router_not_divided_by_scale_factor_fails_router(tokens, s):
    old, good = moe_pair(s=s)
    bad = copy.deepcopy(good)
    with torch.no_grad():
        for b in bad.blocks:
            b.ffn.router.weight.mul_(s)
    rep = assert_caught(old, good, bad, tokens, "router", (ROUTER_FIX, FIX_ROUTER))
    res = rep.results["router"]
    assert res.metrics["router_logit_drift"] > 1e3 * TOL  # logits s times too large: far past the limit
    assert res.fix == FIX_ROUTER
    assert f"  - router: {FIX_ROUTER}" in rep.summary()


def test_router_not_divided_is_caught_even_when_function_is_preserved(tokens):
    """Right after upcycling all experts are identical, so a wrong router does not change the output:
    only the router check can see it (routing will matter as soon as the experts diverge)."""
    old = source("upcycled")
    good = scale_bilaterally(old, 2, 1)
    bad = copy.deepcopy(good)
    with torch.no_grad():
        for b in bad.blocks:
            b.ffn.router.weight.mul_(2)
    assert_caught(old, good, bad, tokens, "router", (ROUTER_FIX,), also_ok=("rope", "functional"))


def test_router_interleaved_input_fails_router(tokens):
    old, good = moe_pair(extra=0)
    bad = copy.deepcopy(good)
    with torch.no_grad():
        for ob, nb in zip(old.blocks, bad.blocks):
            nb.ffn.router.weight.copy_(ob.ffn.router.weight.repeat_interleave(2, dim=1) / 2)
    assert_caught(old, good, bad, tokens, "router", (ROUTER_FIX,))


def test_router_rows_permuted_fails_router_by_topk_disagreement(tokens):
    old, good = moe_pair()
    bad = copy.deepcopy(good)
    with torch.no_grad():
        for b in bad.blocks:  # expert ids shifted against the experts they score
            b.ffn.router.weight.copy_(b.ffn.router.weight.roll(1, dims=0))
    rep = assert_caught(old, good, bad, tokens, "router", (ROUTER_FIX,))
    assert rep.results["router"].metrics["topk_disagreements"] > 0


def test_router_noise_that_does_not_cancel_fails_router(tokens):
    old, good = moe_pair()
    bad = copy.deepcopy(good)
    g = gen(3)
    with torch.no_grad():
        for b in bad.blocks:
            w = b.ffn.router.weight
            w.add_(0.01 * block_rms(w).float() * torch.randn(w.shape, generator=g))
    assert_caught(old, good, bad, tokens, "router", (ROUTER_FIX,))


def test_zero_router_after_upcycling_fails_router_and_symmetry(tokens):
    old = source("dense")
    good = dense_to_moe(old, n_experts=8, top_k=2)
    bad = zero_routers(copy.deepcopy(good))
    rep = assert_caught(old, good, bad, tokens, "router", (FIX_COLLAPSE,), also_ok=("rope", "functional"))
    router = rep.results["router"]
    assert "collapsed" in router.message and "get no token" in router.message
    assert router.metrics["max_dead_experts"] >= 6 and router.metrics["min_load_entropy"] < 0.5
    sym = rep.results["symmetry"]
    assert not sym.passed
    assert "identical experts receive identical gradients" in sym.message
    assert sym.metrics["pairs_identical"] >= 2  # one pair per block at least
    assert not check_symmetry_breaking(bad, tokens).passed
    assert "CHECK(S) FAILED: router, symmetry" in rep.summary()


def test_zero_router_top1_idle_identical_experts_are_reported(tokens):
    old = source("dense")
    assert_all_pass(report(old, dense_to_moe(old, n_experts=8, top_k=1), tokens))
    bad = zero_routers(dense_to_moe(old, n_experts=8, top_k=1))
    rep = report(old, bad, tokens)
    assert not rep.results["router"].passed  # the collapse itself is caught (holds today)
    sym = rep.results["symmetry"]
    assert not sym.passed or sym.metrics["pairs_without_gradient"] > 0, sym.message


def test_router_collapse_inherited_from_old_model_is_not_blamed_on_growth(tokens):
    old = zero_routers(make_model(0, n_experts=8, top_k=2))  # a collapsed phase-2 model (entropy 0.33)
    new = scale_bilaterally(old, 2, 1)  # growth keeps its routing exactly
    rep = report(old, new, tokens)
    res = rep.results["router"]
    assert not res.passed
    assert res.metrics["router_logit_drift"] < TOL and res.metrics["topk_disagreements"] == 0
    assert res.fix != FIX_ROUTER, res.message  # the growth did nothing wrong to the router
    assert "old model" in res.message, res.message
    assert rep.results["functional"].passed and rep.results["rope"].passed


def test_dead_expert_collapse_inherited_from_old_model_is_not_blamed_on_growth(tokens):
    old = dead_expert_router(make_model(0, n_experts=8, top_k=1))
    new = scale_bilaterally(old, 2, 1)
    assert check_functional_equivalence(old, new, tokens).passed  # growth is correct
    res = check_router_integrity(old, new, tokens)
    assert not res.passed and res.metrics["max_dead_experts"] == 3
    assert res.metrics["router_logit_drift"] < TOL and res.metrics["topk_disagreements"] == 0
    assert res.fix != FIX_ROUTER, res.message


def test_router_collapse_introduced_by_growth_is_not_blamed_on_old_model(tokens):
    old, good = moe_pair(extra=2)
    bad = copy.deepcopy(good)
    with torch.no_grad():
        bad.blocks[1].ffn.router.weight.zero_()  # block 1 is an inserted identity copy of old block 0
    assert check_router_integrity(old, good, tokens).passed
    res = check_router_integrity(old, bad, tokens)
    assert not res.passed and "collapsed" in res.message
    assert "already" not in res.message, res.message  # the old model (entropy ~0.97) was balanced
    assert "raise the load-balancing" not in res.fix, res.fix


# ===================================================================== 2. mutations: symmetry check
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


# =================================================================== 2. mutations: functional check
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


# ============================================================================== 3. contract tests
def _pairs():
    dense = source("dense")
    moe = source("upcycled", 1)
    bf16 = source("gqa", 2).to(torch.bfloat16)
    return {
        "dense_s2": (dense, scale_bilaterally(dense, 2, 2)),
        "moe_s2": (moe, scale_bilaterally(moe, 2, 1)),
        "dense_to_moe": (dense, dense_to_moe(dense, 4, 2)),
        "bf16_s3": (bf16, scale_bilaterally(bf16, 3, 1)),
    }


CHECK_CALLS = {
    "rope": lambda o, n, t: check_rope_integrity(o, n, t),
    "rope_default_tokens": lambda o, n, t: check_rope_integrity(o, n),
    "router": lambda o, n, t: check_router_integrity(o, n, t),
    "symmetry": lambda o, n, t: check_symmetry_breaking(n, t),
    "functional": lambda o, n, t: check_functional_equivalence(o, n, t),
    "trainability": lambda o, n, t: check_trainability(n, t),
    "detailed": lambda o, n, t: detailed_growth_check(o, n, t, verbose=False),
}


def _snapshot(model):
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "dtypes": {k: p.dtype for k, p in model.named_parameters()},
        "devices": {k: p.device for k, p in model.named_parameters()},
        "tied": model.lm_head.weight is model.embed.weight,
        "config": copy.deepcopy(model.config),
    }


def _assert_same(before, after):
    assert before["params"].keys() == after["params"].keys()
    for k in before["params"]:
        assert torch.equal(before["params"][k], after["params"][k]), f"parameter {k} changed"
    for k in before["buffers"]:
        assert torch.equal(before["buffers"][k], after["buffers"][k]), f"buffer {k} changed"
    for k, g in before["grads"].items():
        g2 = after["grads"][k]
        assert (g is None) == (g2 is None), f".grad of {k} appeared or vanished"
        assert g is None or torch.equal(g, g2), f".grad of {k} changed"
    for key in ("requires_grad", "modes", "dtypes", "devices", "tied", "config"):
        assert before[key] == after[key], f"{key} changed"


@pytest.fixture(scope="module")
def contract_pairs():
    return _pairs()


@pytest.mark.parametrize("pair", ["dense_s2", "moe_s2", "dense_to_moe", "bf16_s3"])
@pytest.mark.parametrize("check", list(CHECK_CALLS))
def test_checks_leave_inputs_and_global_rng_untouched(tokens, contract_pairs, pair, check):
    old, new = (copy.deepcopy(m) for m in contract_pairs[pair])
    old.train()  # a model in training mode, another in eval mode, with stale grads and a frozen tensor
    new.eval()
    new.blocks[0].train()
    g = gen(21)
    for model in (old, new):
        for i, p in enumerate(model.parameters()):
            p.grad = None if i % 3 == 0 else torch.randn(p.shape, generator=g).to(p.dtype)
    new.norm.weight.requires_grad_(False)
    tokens_before = tokens.clone()
    before = (_snapshot(old), _snapshot(new))
    rng_before = torch.get_rng_state()
    result = CHECK_CALLS[check](old, new, tokens)
    assert torch.equal(torch.get_rng_state(), rng_before), "the check consumed the global torch RNG"
    _assert_same(before[0], _snapshot(old))
    _assert_same(before[1], _snapshot(new))
    assert torch.equal(tokens, tokens_before)
    results = result.results.values() if isinstance(result, GrowthReport) else [result]
    for r in results:
        assert isinstance(r, CheckResult)
        assert isinstance(r.passed, bool) and isinstance(r.name, str) and r.name
        assert isinstance(r.message, str) and r.message and isinstance(r.metrics, dict)


def test_result_fields_names_and_report_structure(tokens):
    old = source("moe")
    new = scale_bilaterally(old, 2, 1)
    rep = report(old, new, tokens)
    assert isinstance(rep, GrowthReport) and isinstance(rep.passed, bool)
    assert list(rep.results) == ["rope", "router", "symmetry", "functional", "trainability"]
    names = {k: r.name for k, r in rep.results.items()}
    assert names == {"rope": "RoPE integrity", "router": "Router integrity", "symmetry": "Symmetry breaking",
                     "functional": "Functional equivalence", "trainability": "Trainability"}
    assert rep.passed == all(r.passed for r in rep.results.values())
    for key, fn in (("rope", check_rope_integrity), ("router", check_router_integrity),
                    ("functional", check_functional_equivalence)):
        alone = fn(old, new, tokens)
        assert alone.name == names[key] and alone.passed == rep.results[key].passed
        assert str(alone).startswith("✓ PASSED  " + alone.name)
    assert check_symmetry_breaking(new, tokens).name == names["symmetry"]


def test_checks_are_deterministic(tokens):
    old = source("upcycled")
    new = scale_bilaterally(old, 3, 1)
    a, b = report(old, new, tokens), report(old, new, tokens)
    for k in a.results:
        assert a.results[k].message == b.results[k].message
        assert a.results[k].metrics == b.results[k].metrics


def test_failing_messages_carry_measured_value_and_limit(tokens):
    old, good = moe_pair(extra=2)
    # functional + router: logits of the grown router x2
    bad = copy.deepcopy(good)
    with torch.no_grad():
        for b in bad.blocks:
            b.ffn.router.weight.mul_(2)
    router = check_router_integrity(old, bad, tokens)
    assert f"drifted by {router.metrics['router_logit_drift']:.2e}" in router.message
    assert "(limit 1e-05)" in router.message
    func = check_functional_equivalence(old, bad, tokens)
    first = func.metrics["first_bad_layer"]
    d = func.metrics["layer_drift"][first.split(" (")[0]]
    assert f"relative drift {d:.2e} (limit 1e-05" in func.message
    assert f"logits drift {func.metrics['logits_drift']:.2e}" in func.message
    # the limit printed is the tolerance passed
    func_loose = check_functional_equivalence(old, bad, tokens, tolerance=1e-4)
    assert "(limit 1e-04" in func_loose.message
    # symmetry
    sym = check_symmetry_breaking(pure_clone(old, 2, 2), tokens)
    assert f"relative difference {sym.metrics['min_relative_difference']:.1e}, below 2e-13" in sym.message
    weak = check_symmetry_breaking(scale_bilaterally(old, 2, 2, noise_std=1e-6), tokens)
    assert f"median {weak.metrics['median_relative_difference']:.1e} relative (limit >= 1e-03)" in weak.message
    # RoPE: attention-probability drift
    rope = check_rope_integrity(old, permute_qk_pairs(copy.deepcopy(good)), tokens)
    assert f"drift by {rope.metrics['max_attention_prob_drift']:.2e}" in rope.message
    assert "(limit 1e-05)" in rope.message
    # router collapse: measured entropy / dead experts and their limits
    collapsed = check_router_integrity(source("dense"), zero_routers(dense_to_moe(source("dense"), 8, 2)), tokens)
    assert f"load entropy {collapsed.metrics['min_load_entropy']:.2f} of ln(E) (limit >= 0.5)" in collapsed.message
    assert f"{collapsed.metrics['max_dead_experts']} of 8 experts get no token (limit 2)" in collapsed.message


def test_tolerance_is_what_decides(tokens):
    """A 1e-3 drift fails at the default tolerance and passes when the caller allows 1e-1: the verdict
    tracks the measurement, it is not hard-wired."""
    old = source("dense")
    bad = scale_bilaterally(old, 2, 0)
    with torch.no_grad():
        bad.blocks[1].ffn.down_proj.weight.mul_(1 + 1e-3)
    assert not check_functional_equivalence(old, bad, tokens).passed
    assert check_functional_equivalence(old, bad, tokens, tolerance=1e-1).passed


def test_summary_printed_on_success(tokens, capsys):
    old = source("dense")
    new = scale_bilaterally(old, 2, 1)
    rep = detailed_growth_check(old, new, tokens)
    out = capsys.readouterr().out
    assert rep.passed
    assert "VERIFICATION SUMMARY" in out
    assert "✓ ALL CHECKS PASSED" in out
    assert "Model is ready for Phase 3 training." in out
    assert out.count("✓ PASSED") == 5 and "✗" not in out
    assert rep.summary() in out


def test_summary_printed_on_failure(tokens, capsys):
    old = source("dense")
    bad = pure_clone(old, 2, 1)
    rep = detailed_growth_check(old, bad, tokens)
    out = capsys.readouterr().out
    assert not rep.passed
    assert "VERIFICATION SUMMARY" in out
    assert "✗ FAILED  Symmetry breaking" in out
    assert "✗ 1 CHECK(S) FAILED: symmetry" in out
    assert f"  - symmetry: {FIX_SYMMETRY}" in out
    assert out.count("✓ PASSED") == 4
    assert "ALL CHECKS PASSED" not in out and "ready for Phase 3" not in out


def test_verbose_false_prints_nothing(tokens, capsys):
    old = source("dense")
    detailed_growth_check(old, pure_clone(old, 2, 0), tokens, verbose=False)
    assert capsys.readouterr().out == ""


def test_rope_check_with_default_tokens(tokens):
    old = source("gqa")
    good = scale_bilaterally(old, 2, 1)
    res = check_rope_integrity(old, good)
    assert res.passed, res.message
    assert res.metrics["seq_len"] == 128  # min(max_seq_len, 128)
    bad = rebuild(replace(good.config, rope_theta=1e6), good.state_dict())
    assert not check_rope_integrity(old, bad).passed
    assert not check_rope_integrity(old, permute_qk_pairs(copy.deepcopy(good))).passed


def test_rope_default_tokens_respect_short_max_seq_len():
    old = make_model(0, max_seq_len=32)
    res = check_rope_integrity(old, scale_bilaterally(old, 2, 0))
    assert res.passed and res.metrics["seq_len"] == 32


def test_too_short_or_malformed_tokens_raise_value_error(tokens):
    old = source("dense")
    new = scale_bilaterally(old, 2, 1)
    with pytest.raises(ValueError, match="RoPE"):
        check_rope_integrity(old, new, tokens[:, :8])
    with pytest.raises(ValueError):
        detailed_growth_check(old, new, tokens[:, :15], verbose=False)
    with pytest.raises(ValueError):
        check_rope_integrity(make_model(0, max_seq_len=8), make_model(0, max_seq_len=8))  # default ids too short
    with pytest.raises(ValueError):
        check_functional_equivalence(old, new, tokens.int())
    with pytest.raises(ValueError):
        check_router_integrity(old, new, tokens[0])  # 1-D
    # the functional check itself needs no long sequence
    assert check_functional_equivalence(old, new, tokens[:, :1]).passed


def test_not_a_grown_pair_is_rejected(tokens):
    old = source("dense")
    other_vocab = make_model(0, vocab_size=320)
    rep = report(old, scale_bilaterally(other_vocab, 2, 0), tokens)
    assert list(rep.results) == ["pair"]  # rejected once, not by every check
    assert not rep.results["pair"].passed and "not a grown pair" in rep.results["pair"].message
    assert not rep.passed
    for check in ("rope", "router", "functional"):  # standalone checks reject it too
        alone = standalone(check, old, scale_bilaterally(other_vocab, 2, 0), tokens)
        assert not alone.passed and "not a grown pair" in alone.message
    shallower = report(scale_bilaterally(old, 1, 2), old, tokens)
    assert "fewer layers" in shallower.results["pair"].message


def test_symmetry_check_on_ungrown_dense_model_has_nothing_to_compare(tokens):
    res = check_symmetry_breaking(source("dense"), tokens)
    assert res.passed and res.fix == ""


# ------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    t = story_tokens(4, 64)
    assert t.shape == (4, 64) and int(t.max()) < 256
    return t


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


def test_upcycling_check_passes_correct_upcycling_and_fails_a_collapsed_router(tokens, capsys):
    from transfer.verify_growth_mechanics import upcycling_check

    old = source("dense")
    assert upcycling_check(old, dense_to_moe(old, 4, 2), tokens).passed
    assert "✓ PASSED — functional equivalence confirmed" in capsys.readouterr().out
    rep = upcycling_check(old, zero_routers(dense_to_moe(old, 8, 2)), tokens)
    assert not rep.passed and not rep.results["router"].passed and rep.results["functional"].passed
    assert "✗ FAILED" in capsys.readouterr().out

"""transfer/checks/suite.py over many growths: no false alarm on correct growth (seeds, scale factors 1-4, 0-8 inserted
blocks, dense / MoE / upcycled / GQA / MQA / tied / untied sources, calibrated routers), standalone checks agreeing
with detailed_growth_check, and the contracts every check keeps (inputs and global RNG untouched, result fields,
determinism, messages with measured value and limit, the tolerance deciding, argument validation); upcycling_check.
The suite's own mechanics (shared copies, one gradient, root cause first) are in test_checks_suite.py."""
import copy
from dataclasses import replace

import pytest
import torch

from tests.growth_pairs import (TOL, assert_all_pass, gen, make_model, moe_pair, permute_qk_pairs, pure_clone, rebuild,
                                report, source, standalone, zero_routers)
from transfer.checks import (CheckResult, GrowthReport, check_functional_equivalence, check_rope_integrity,
                             check_router_integrity, check_symmetry_breaking, check_trainability, detailed_growth_check)
from transfer.simple_growth import dense_to_moe, scale_bilaterally


# ------------------------------------------------------------------- no false alarms on correct growth
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

# ------------------------------------------------------------------------------- contract tests
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

# -------------------------------------------------------------------------------- upcycling_check
def test_upcycling_check_passes_correct_upcycling_and_fails_a_collapsed_router(tokens, capsys):
    from transfer.verify_growth_mechanics import upcycling_check

    old = source("dense")
    assert upcycling_check(old, dense_to_moe(old, 4, 2), tokens).passed
    assert "✓ PASSED — functional equivalence confirmed" in capsys.readouterr().out
    rep = upcycling_check(old, zero_routers(dense_to_moe(old, 8, 2)), tokens)
    assert not rep.passed and not rep.results["router"].passed and rep.results["functional"].passed
    assert "✗ FAILED" in capsys.readouterr().out

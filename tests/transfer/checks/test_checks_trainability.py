"""Tests of the trainability check (transfer/checks/trainability.py).

Dead-but-exact growths (inner weights of inserted blocks zeroed together with their output projections, a dead
head, a dead expert) preserve the function and pass RoPE, router, symmetry and functional: trainability alone
must catch each, naming block, module and units. The project's own identity blocks (o_proj and down_proj zero:
dead for one step, alive after) must pass, idle units must be reported apart, and the judge is tested without
models. The no-false-alarm grid over scale factors, depths, sources and seeds runs every check, trainability
included, in test_checks_suite_grid.py.

    python -m pytest tests/transfer/checks/test_checks_trainability.py -q
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from config import TrainConfig
from tests.growth_pairs import dead_expert_router, make_model, source, story_tokens
from transfer.checks import FIX_TRAINABILITY, detailed_growth_check
from transfer.checks.objective import objective_gradients
from transfer.checks.pair import copy_model
from transfer.checks.trainability import (DEFAULT_STEP_LR, DeadUnits, ParameterGradient, TrainabilityLimits,
                                          TrainabilityStats, check_trainability, first_step_lr, judge_trainability,
                                          measure_trainability)
from transfer.simple_growth import dense_to_moe, scale_bilaterally

INSERTED = "block 1 (inserted identity copy of old block 0)"  # layout of 2 old blocks + 2 inserted
ATTENTION = {"attention_norm", "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"}


def ffn_names(kind: str) -> dict[str, str]:
    w = "" if kind == "moe" else ".weight"
    return {k: f"ffn.{k}_proj{w}" for k in ("gate", "up", "down")}


def zeroed(model, block: int, names: list[str]):
    """A copy of model with the named weights of one block set to zero."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            model.blocks[block].get_parameter(name).zero_()
    return model


def mutations(kind: str) -> dict[str, tuple[list[str], set[str]]]:
    """name -> (weights of the inserted block 1 to zero besides the project's own o_proj/down_proj zeros,
    modules expected dead). In an MoE the FFN norm also feeds the router, whose balance and z losses give it
    gradient: a zero FFN norm then moves at step 1, the experts' down_proj at step 2 (on an input of ~lr),
    gate and up only at step 3, so within 2 steps gate and up are dead and down_proj nearly so."""
    f = ffn_names(kind)
    ffn_dead = {"ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"} | ({"ffn_norm"} if kind == "dense" else set())
    return {
        "o_proj+v_proj": (["attention.v_proj.weight"], ATTENTION),
        "o_proj+attention_norm": (["attention_norm.weight"], ATTENTION),
        "q,k,v,o": ([f"attention.{p}_proj.weight" for p in "qkv"], ATTENTION),
        "down_proj+up_proj": ([f["up"]], ffn_dead),
        "down_proj+ffn_norm": (["ffn_norm.weight"], ffn_dead if kind == "dense" else {"ffn.gate_proj", "ffn.up_proj"}),
    }


def dead_modules(result) -> set[str]:
    return {d["module"] for d in result.metrics["dead_units"]}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return story_tokens(4, 64)


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ the project's own growth: 2 steps needed
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_project_identity_blocks_get_gradient_on_inner_weights_only_at_step_2(tokens, kind):
    old = source(kind)
    new = scale_bilaterally(old, 2, 2)
    stats = measure_trainability(copy_model(new, torch.float64), tokens, TrainConfig())
    assert stats.steps == 2 and not stats.dead
    by_name = {p.name: p for p in stats.parameters}
    f = ffn_names(kind)
    for j in (1, 3):  # inserted blocks: output projections move first, inner weights follow one step later
        for name in ("attention.o_proj.weight", f["down"]):
            p = by_name[f"blocks.{j}.{name}"]
            assert p.alive_after[0] == p.judged > 0, name
        inner = ["attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight",
                 "attention_norm.weight", f["gate"], f["up"]] + (["ffn_norm.weight"] if kind == "dense" else [])
        for name in inner:
            p = by_name[f"blocks.{j}.{name}"]
            assert p.alive_after == [0, p.judged] and p.judged > 0, (name, p)
            assert p.relative_rms[1] > 1e-7, (name, p.relative_rms)  # ~1e-5: far above the 2e-13 zero line
    for j in (0, 2):  # original blocks: everything at step 1
        for name in ("attention.q_proj.weight", f["gate"]):
            p = by_name[f"blocks.{j}.{name}"]
            assert p.alive_after[0] == p.judged


def test_one_step_is_not_enough_for_the_project_identity_blocks(tokens):
    old = source("dense")
    new = scale_bilaterally(old, 2, 2)
    one = check_trainability(new, tokens, steps=1)
    assert not one.passed and "within 1 step (" in one.message
    assert "block 1: " in one.message and "block 3: " in one.message  # standalone: no layout to name the source
    assert dead_modules(one) == ATTENTION - {"attention.o_proj"} | {"ffn.gate_proj", "ffn.up_proj", "ffn_norm"}
    assert check_trainability(new, tokens, steps=2).passed


def test_growth_without_inserted_blocks_needs_one_step(tokens):
    old = source("moe")
    res = check_trainability(scale_bilaterally(old, 2, 0), tokens)
    assert res.passed and res.metrics["steps"] == 1  # nothing waited: no second evaluation was made
    assert res.metrics["alive_after_step"] == [res.metrics["judged_weights"]]


# ------------------------------------------------------------------------------ dead-but-exact growths
CASES = [(kind, name) for kind in ("dense", "moe") for name in mutations(kind)]


@pytest.mark.slow
@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_dead_but_exact_inserted_block_is_caught_by_trainability_alone(tokens, kind, name):
    old = source(kind)
    good = scale_bilaterally(old, 2, 2)
    names, expected = mutations(kind)[name]
    bad = zeroed(good, 1, names)
    rep = detailed_growth_check(old, bad, tokens, verbose=False)
    res = rep.results["trainability"]
    assert not res.passed and res.fix == FIX_TRAINABILITY
    if (kind, name) == ("moe", "down_proj+ffn_norm"):  # see mutations(): down_proj's gradient at step 2 is ~lr^2
        assert expected <= dead_modules(res) <= expected | {"ffn.down_proj"}, res.message
    else:
        assert dead_modules(res) == expected, res.message
    assert {d["place"] for d in res.metrics["dead_units"]} == {INSERTED}
    assert f"{INSERTED}: " in res.message and f"Fix: {FIX_TRAINABILITY}." in res.message
    assert f"{res.metrics['dead_weights']} weights reached by the batch never receive gradient" in res.message
    assert rep.results["functional"].passed  # exact: the old four checks cannot see it
    others = ("rope", "router", "symmetry") if (kind, name) != ("moe", "down_proj+ffn_norm") else ("rope", "symmetry")
    for other in others:  # a zero FFN norm in an MoE also sends every token to the same experts: router fails too
        assert rep.results[other].passed, rep.results[other].message
    assert "  - trainability: " in rep.summary()
    assert not check_trainability(bad, tokens).passed  # standalone agrees


@pytest.mark.parametrize("kind", ["dense", "gqa"])
def test_dead_head_is_caught_and_named(tokens, kind):
    """One head's value rows zeroed in an inserted block (whose o_proj is zero): that head's output is zero, so
    its o_proj columns get no gradient, so its q/k/v rows never do either."""
    old = source(kind)
    new = scale_bilaterally(old, 2, 2)
    hd, group = new.config.head_dim, new.config.n_heads // new.config.kv_heads
    bad = copy.deepcopy(new)
    with torch.no_grad():
        bad.blocks[1].attention.v_proj.weight[hd:2 * hd] = 0  # kv head 1
    rep = detailed_growth_check(old, bad, tokens, verbose=False)
    assert all(rep.results[k].passed for k in ("rope", "router", "symmetry", "functional")), rep.summary()
    res = rep.results["trainability"]
    assert not res.passed
    units = {d["module"]: d for d in res.metrics["dead_units"]}
    assert set(units) == {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"}
    assert units["attention.v_proj"]["dead_units"] == [1] and units["attention.v_proj"]["unit"] == "kv head"
    assert units["attention.o_proj"]["dead_units"] == list(range(group, 2 * group))  # query heads reading it
    assert "attention.v_proj (1 of" in res.message


def test_dead_expert_is_caught_and_named(tokens):
    """One expert of an inserted MoE block with its up_proj zeroed (its down_proj is zero): it receives tokens
    but neither its gate, up nor down weights ever get gradient."""
    old = source("moe")
    bad = scale_bilaterally(old, 2, 2)
    with torch.no_grad():
        bad.blocks[1].ffn.up_proj[2] = 0
    rep = detailed_growth_check(old, bad, tokens, verbose=False)
    assert all(rep.results[k].passed for k in ("rope", "router", "symmetry", "functional")), rep.summary()
    res = rep.results["trainability"]
    assert not res.passed
    for d in res.metrics["dead_units"]:
        assert d["unit"] == "expert" and d["dead_units"] == [2] and d["n_units"] == 4, d
    assert dead_modules(res) == {"ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"}
    assert "ffn.up_proj (1 of 4 experts: 2;" in res.message


def test_dead_unit_in_an_original_block_is_caught(tokens):
    """Not only inserted blocks: an ungrown model whose o_proj and v_proj of one block are zero (an exact
    model of its own, compared with itself) is caught, labelled as an original block."""
    model = zeroed(source("dense"), 0, ["attention.o_proj.weight", "attention.v_proj.weight"])
    rep = detailed_growth_check(model, model, tokens, verbose=False)
    res = rep.results["trainability"]
    assert not res.passed and dead_modules(res) == ATTENTION
    assert "block 0 (old block 0): " in res.message


# --------------------------------------------------------------------------------- idle, not dead
def test_absent_token_ids_are_idle_not_dead(tokens):
    old = source("dense_untied")
    res = check_trainability(scale_bilaterally(old, 2, 1), tokens)
    assert res.passed
    absent = old.config.vocab_size - len(tokens[:, :-1].unique())
    assert res.metrics["idle_embedding_rows"] == absent > 0
    assert f"{absent} embedding rows of ids absent from the batch" in res.message


def test_tied_embedding_has_no_idle_rows(tokens):
    res = check_trainability(source("dense"), tokens)  # the LM head reaches every row
    assert res.passed and res.metrics["idle_embedding_rows"] == 0


def test_experts_without_tokens_are_idle_not_dead(tokens):
    old = dead_expert_router(make_model(0, n_experts=8, top_k=1))  # experts 5, 6, 7 never win
    res = check_trainability(scale_bilaterally(old, 2, 1), tokens)
    assert res.passed, res.message
    assert {"block 0 expert 5", "block 0 expert 7", "block 2 expert 6"} <= set(res.metrics["idle_experts"])
    assert "experts without tokens: block 0 expert 5" in res.message


# ----------------------------------------------------------------------- the objective matters: router
def test_upcycled_router_gets_gradient_from_balance_and_z_losses(tokens):
    """Identical experts: the LM loss gives the router only rounding (~1e-18), the balance and z losses a real
    gradient at step 1. Without them the router waits for the experts to diverge (step 2)."""
    moe = dense_to_moe(source("dense"), 8, 2)
    model = copy_model(moe, torch.float64)
    routers = [f"blocks.{j}.ffn.router.weight" for j in range(moe.config.n_layers)]

    def router_alive(tc, steps):
        stats = measure_trainability(model, tokens, tc, steps=steps)
        return [p.alive_after for p in stats.parameters if p.name in routers], stats

    alive, stats = router_alive(TrainConfig(), 2)
    assert all(a[0] > 0 and a[0] == p.judged for a, p in zip(alive, [q for q in stats.parameters if q.name in routers]))
    assert stats.steps == 1
    lm_only = TrainConfig(balance_coef=0.0, z_coef=0.0)
    alive, stats = router_alive(lm_only, 1)
    assert all(a == [0] for a in alive), alive
    res = check_trainability(moe, tokens, steps=1, train_config=lm_only)
    assert not res.passed and dead_modules(res) == {"ffn.router"}
    assert check_trainability(moe, tokens, steps=2, train_config=lm_only).passed


def test_upcycling_check_runs_trainability(tokens, capsys):
    from transfer.checks import upcycling_check

    old = source("dense")
    rep = upcycling_check(old, dense_to_moe(old, 4, 2), tokens)
    assert rep.passed and list(rep.results) == ["functional", "router", "trainability"]
    assert rep.results["trainability"].metrics["steps"] == 1
    bad = dense_to_moe(old, 4, 2)
    with torch.no_grad():  # one expert's up and down zeroed (the functional check fails too): its weights are dead
        bad.blocks[0].ffn.up_proj[1] = 0
        bad.blocks[0].ffn.down_proj[1] = 0
    rep = upcycling_check(old, bad, tokens, verbose=False)
    assert not rep.results["trainability"].passed
    assert "block 0 (old block 0): ffn.gate_proj (1 of 4 experts: 1;" in rep.results["trainability"].message


# ---------------------------------------------------------------------------- the judge, without models
def _stats(dead: list[DeadUnits], idle_rows: int = 0, idle_experts: list[str] | None = None) -> TrainabilityStats:
    params = [ParameterGradient("blocks.0.attention.q_proj.weight", 100, 100, [40, 100], [1e-1, 3e-3]),
              ParameterGradient("embed.weight", 50, 30, [30, 30], [2e-1, None])]
    return TrainabilityStats(2, 3e-4, params, dead, idle_rows, idle_experts or [], 4.2, 2.2e-13, 4e-6)


def test_judge_passes_without_dead_weights_and_reports_idle_apart():
    res = judge_trainability(_stats([], idle_rows=20, idle_experts=["block 3 expert 1"]))
    assert res.passed and res.fix == ""
    m = res.metrics
    assert m["alive_after_step"] == [70, 130] and m["judged_weights"] == 130 and m["weights"] == 150
    assert m["weakest_relative_gradient"] == pytest.approx(3e-3)  # each parameter's latest figure
    assert "130 weights the batch reached receive gradient within 2 step(s): 70 at step 1, the other 60 after" in res.message
    assert "the weakest unit's RMS gradient is 4.0e-06 of the model's (none at or below 2e-13)" in res.message
    assert "Idle, not judged: 20 embedding rows of ids absent from the batch; experts without tokens: block 3 expert 1" in res.message


def test_judge_fails_on_any_dead_weight_and_lists_units_by_block():
    dead = [DeadUnits("block 1 (inserted identity copy of old block 0)", "attention.v_proj", "kv head", [2], 4, 16, 64),
            DeadUnits("block 1 (inserted identity copy of old block 0)", "attention.o_proj", "head", [2], 4, 16, 64),
            DeadUnits("model", "norm", "dimension", [], 8, 0, 8)]
    res = judge_trainability(_stats(dead))
    assert not res.passed and res.fix == FIX_TRAINABILITY and res.metrics["dead_weights"] == 32
    assert ("32 weights reached by the batch never receive gradient within 2 steps (their unit's RMS gradient at "
            "most 2.2e-13 of the model's; limit 0 such weights)") in res.message
    assert ("block 1 (inserted identity copy of old block 0): attention.v_proj (1 of 4 kv heads: 2; 16 of 64 weights), "
            "attention.o_proj (1 of 4 heads: 2; 16 of 64 weights)") in res.message
    assert judge_trainability(_stats(dead), TrainabilityLimits(max_dead_weights=32)).passed  # the limit decides


def test_judge_says_all_units_without_listing_them():
    d = DeadUnits("block 3", "ffn.gate_proj", "expert", [0, 1, 2, 3], 4, 400, 400)
    assert d.describe() == "ffn.gate_proj (4 of 4 experts; 400 of 400 weights)"
    assert DeadUnits("block 1", "ffn_norm", "vector", [0], 1, 64, 64).describe() == "ffn_norm (the whole vector; 64 of 64 weights)"
    many = DeadUnits("block 3", "ffn.gate_proj.weight", "neuron", list(range(10)), 64, 10, 640)
    assert many.describe() == "ffn.gate_proj.weight (10 of 64 neurons: 0, 1, 2, 3, 4, 5, 6, 7 ...; 10 of 640 weights)"


def test_trainability_on_random_init_model_needs_one_step(tokens):
    res = check_trainability(make_model(3, n_experts=4, top_k=2, tie_embeddings=False), tokens)
    assert res.passed and res.metrics["steps"] == 1


def test_steps_must_be_positive(tokens):
    with pytest.raises(ValueError):
        check_trainability(source("dense"), tokens, steps=0)


def test_learning_rate_and_coefficients_come_from_train_config(tokens):
    new = scale_bilaterally(source("moe"), 2, 1)
    tc = replace(TrainConfig(), grown_lr=1e-4)
    res = check_trainability(new, tokens, train_config=tc, lr=first_step_lr(tc.grown_lr, tc))  # as the stage passes it
    assert res.passed and res.metrics["lr"] == pytest.approx(1e-4 / tc.warmup_steps)  # warm-up step 1 of phase 3
    assert check_trainability(new, tokens, train_config=tc).metrics["lr"] == DEFAULT_STEP_LR  # no lookup of grown_lr
    assert check_trainability(new, tokens, lr=2e-3).metrics["lr"] == 2e-3


def test_single_weights_without_gradient_inside_a_live_unit_are_not_blamed(tokens):
    """Units are judged, not weights: with one embedding column zero, block 0's q/k/v/gate/up columns reading it
    get exactly zero gradient, yet every head and neuron learns (at dim 512, a few live weights per million fall
    under the rounding line by chance; a per-weight rule cried wolf there)."""
    model = source("dense_untied")
    with torch.no_grad():
        model.embed.weight[:, 5] = 0
    stats = measure_trainability(copy_model(model, torch.float64), tokens, TrainConfig())
    q = next(p for p in stats.parameters if p.name == "blocks.0.attention.q_proj.weight")
    grads = objective_gradients(copy_model(model, torch.float64), tokens, TrainConfig()).grads
    assert (grads[q.name][:, 5] == 0).all()  # the premise
    assert not stats.dead and q.alive_after == [q.judged]


def test_step_2_of_the_blocks_alone_matches_the_whole_model_to_first_order(tokens):
    """The second evaluation runs each waiting block alone on its step-1 input and output gradient: the same
    units alive as the whole model's gradient at the stepped weights, and the same gradients up to O(lr)."""
    from transfer.checks.trainability import _adamw_first_step, _block_gradients

    model = copy_model(scale_bilaterally(source("moe"), 2, 2), torch.float64)
    tc = TrainConfig()
    first = objective_gradients(model, tokens, tc, block_io=True)
    waiting = [f"blocks.{j}.attention.{p}_proj.weight" for j in (1, 3) for p in "qkv"] + ["blocks.3.ffn.gate_proj"]

    def mismatch(lr: float) -> float:
        values = {n: _adamw_first_step(p.detach(), first.grads[n], lr, tc) for n, p in model.named_parameters()}
        local = _block_gradients(model, first, values, waiting, [1, 3], tc)
        whole = objective_gradients(model, tokens, tc, values=values, wrt=waiting)
        assert all(local.grads[n].abs().max() > 0 for n in waiting)
        return max(((whole.grads[n] - local.grads[n]).norm() / whole.grads[n].norm()).item() for n in waiting)

    small, ten_times = mismatch(1e-7), mismatch(1e-6)
    assert ten_times < 0.01 and 5 < ten_times / small < 20, (small, ten_times)  # proportional to the step
    assert mismatch(tc.grown_lr / tc.warmup_steps) < 0.05  # measured 2.5e-2 at the default first step


def test_a_zero_final_norm_is_evaluated_on_the_whole_model_and_recovers(tokens):
    """No gradient reaches any block at step 1 (the final norm's output is zero), so the blocks cannot be
    evaluated alone; the whole model is, and everything has gradient once the norm has moved."""
    model = scale_bilaterally(source("dense"), 2, 0)
    with torch.no_grad():
        model.norm.weight.zero_()
    res = check_trainability(model, tokens)
    assert res.passed and res.metrics["steps"] == 2, res.message
    assert res.metrics["alive_after_step"][0] < res.metrics["judged_weights"]

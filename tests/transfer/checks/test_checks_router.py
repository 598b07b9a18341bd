"""Tests of transfer/checks/router.py: the judge on hand-made stats (no models); experts relabelled consistently
(router rows and expert weights permuted together) pass as the same routing; a changed norm is reported as the
root cause of the router's drift, not as a router fault."""
import copy
from dataclasses import replace

import torch

from tests.growth_pairs import moe_pair, rebuild, source, story_tokens
from transfer.checks.results import (FIX_COLLAPSE, FIX_INSERTED_COLLAPSE, FIX_NORM, FIX_RETRAIN_BALANCE,
                                     FIX_ROUTER)
from transfer.checks.router import (BlockBalance, BlockRouting, RouterLimits, RouterStats, check_router_integrity,
                                    judge_router)
from transfer.simple_growth import dense_to_moe, scale_bilaterally


def balance(j, entropy=0.95, dead=0, inserted=False, old=(0.95, 0)):
    return BlockBalance(j, f"block {j}", inserted, entropy, dead, *(old if not inserted else (None, None)))


def routing(j, drift=1e-15, disagree=0, ties=0, load=0, input_drift=1e-16, perm=None):
    return BlockRouting(j, f"block {j} (old block {j})", drift, disagree, ties, load, input_drift, perm)


def stats(bal, rout=(), old_is_moe=True, changes=()):
    return RouterStats(True, old_is_moe, 8, 2, list(bal), list(rout), list(changes))


def test_judge_dense_and_healthy():
    assert judge_router(RouterStats(False, False)).passed
    r = judge_router(stats([balance(0), balance(1, inserted=True)], [routing(0)]))
    assert r.passed and "100% top-2 agreement" in r.message and r.metrics["router_logit_drift"] == 1e-15


def test_judge_collapse_fix_follows_where_it_comes_from():
    collapsed = dict(entropy=0.3, dead=6)
    assert judge_router(stats([balance(0, **collapsed)], old_is_moe=False)).fix == FIX_COLLAPSE
    assert judge_router(stats([balance(0), balance(1, inserted=True, **collapsed)], [routing(0)])).fix == FIX_INSERTED_COLLAPSE
    assert judge_router(stats([balance(0, **collapsed, old=(0.33, 6))], [routing(0)])).fix == FIX_RETRAIN_BALANCE
    assert judge_router(stats([balance(0, **collapsed)], [routing(0)])).fix == FIX_ROUTER
    assert judge_router(stats([balance(0, **collapsed)], old_is_moe=False), RouterLimits(min_load_entropy=0.2,
                                                                                          max_dead_fraction=0.8)).passed


def test_judge_own_disagreement_blames_the_router():
    r = judge_router(stats([balance(0)], [routing(0, drift=3.9, disagree=12, load=5)]))
    assert not r.passed and r.fix == FIX_ROUTER and r.consequence_of is None
    assert "router logits drifted by 3.90e+00" in r.message and "misses 12 token(s)" in r.message
    assert judge_router(stats([balance(0)], [routing(0, load=2, ties=2)])).passed  # near-ties explain the load


def test_judge_disagreement_on_a_drifting_input_is_a_consequence():
    r = judge_router(stats([balance(0)], [routing(0, drift=6e-3, input_drift=7e-2)], changes=["norm_eps 1e-05 -> 1e-06"]))
    assert not r.passed and r.consequence_of == "block 0 (old block 0) ffn_norm"
    assert r.fix.startswith("restore norm_eps") and FIX_ROUTER not in r.fix
    assert judge_router(stats([balance(0)], [routing(0, drift=6e-3, input_drift=7e-2)])).fix == FIX_NORM


def test_judge_reports_a_relabelling_as_the_same_routing():
    r = judge_router(stats([balance(0)], [routing(0, perm=[2, 0, 3, 1])]))
    assert r.passed and "relabelled consistently" in r.message and "block 0 (old block 0) as [2, 0, 3, 1]" in r.message
    assert r.metrics["expert_relabelling"] == {"block 0 (old block 0)": [2, 0, 3, 1]}


def relabel(model, perm, router=True, experts=True):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for b in model.blocks:
            f = b.ffn
            if experts:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    getattr(f, name).copy_(getattr(f, name)[perm])
            if router:
                f.router.weight.copy_(f.router.weight[perm])
    return model


def test_consistent_relabelling_of_distinct_experts_passes():
    old, good = moe_pair(extra=1)
    t = story_tokens()
    perm = torch.tensor([2, 0, 3, 1])
    r = check_router_integrity(old, relabel(good, perm), t)
    assert r.passed, r.message
    assert list(r.metrics["expert_relabelling"].values()) == [perm.tolist()] * 2  # new expert e is old perm[e]
    assert not check_router_integrity(old, relabel(good, perm, experts=False), t).passed  # rows alone: not the same
    assert check_router_integrity(old, relabel(good, perm, router=False), t).passed  # experts alone: same routing,
    # a different function, which the functional check catches (test_checks_functional_mutations.py)


def test_relabelling_identical_experts_by_router_rows_changes_nothing():
    old = dense_to_moe(source("dense"), 4, 2)
    t = story_tokens()
    r = check_router_integrity(old, relabel(scale_bilaterally(old, 2, 0), torch.tensor([1, 2, 3, 0]), experts=False), t)
    assert r.passed and r.metrics["expert_relabelling"]


def test_norm_eps_change_is_not_blamed_on_the_router():
    old, good = moe_pair(extra=1)
    bad = rebuild(replace(good.config, norm_eps=1e-6), good.state_dict())
    r = check_router_integrity(old, bad, story_tokens())
    assert not r.passed and r.consequence_of.endswith("ffn_norm") and FIX_ROUTER not in r.fix

"""Tests of transfer/checks/rope.py: the judge on hand-made stats (no models), and the root-cause rule on real
growths: attention drift whose input already drifts (a changed norm) is reported as that drift's consequence."""
import copy
from dataclasses import replace

import pytest
import torch

from models.model import rope_tables
from tests.growth_pairs import (ROPE_FIX, TOL, assert_all_pass, assert_caught, kv_heads_kept, permute_qk_pairs, rebuild,
                                report, source, story_tokens)
from transfer.checks.results import FIX_NORM, FIX_ROPE
from transfer.checks.rope import BlockAttention, RopeLimits, RopeStats, check_rope_integrity, judge_rope
from transfer.simple_growth import scale_bilaterally


def stats(blocks=(), table=0.0, new_heads=(8, 8, 8), theta=10000.0, changes=()):
    return RopeStats(2, (4, 4, 8), new_heads, 10000.0, theta, list(changes), table, list(blocks), 64)


def block(j, drift, input_drift=1e-16):
    return BlockAttention(j, f"block {j} (old block {j})", drift, drift / 2, input_drift)


def test_judge_passes_small_drift():
    r = judge_rope(stats([block(0, 2e-9), block(2, 3e-9)]))
    assert r.passed and r.fix == "" and r.metrics["max_attention_prob_drift"] == 3e-9
    assert "within 3.0e-09 (limit 1e-05)" in r.message


def test_judge_config_problems_need_no_dynamic_part():
    r = judge_rope(stats(new_heads=(4, 4, 16), table=None))
    assert not r.passed and r.fix == FIX_ROPE and "head_dim changed from 8 to 16" in r.message
    assert "rope_theta changed" in judge_rope(stats(theta=5e5, table=None)).message


def test_judge_table_drift():
    r = judge_rope(stats(table=3e-3))
    assert not r.passed and "RoPE cos/sin tables differ by 3.00e-03 (limit 1e-05)" in r.message


def test_judge_own_drift_blames_rope_and_the_blocks_qk():
    r = judge_rope(stats([block(0, 1e-9), block(2, 4e-2)]))
    assert not r.passed and r.consequence_of is None and r.fix.startswith(FIX_ROPE)
    assert "drift by 4.00e-02 at off-diagonal positions (limit 1e-05), worst in block 2 (old block 2)" in r.message


def test_judge_drift_on_a_drifting_input_is_a_consequence():
    r = judge_rope(stats([block(0, 3e-4, input_drift=6e-2)], changes=["norm_eps 1e-05 -> 1e-06"]))
    assert not r.passed and r.consequence_of == "block 0 (old block 0) attention_norm"
    assert r.fix == "restore norm_eps (norm_eps 1e-05 -> 1e-06): growth must keep it" and FIX_ROPE not in r.fix
    assert "its attention_norm output differs by 6.00e-02 relative (limit 1e-05)" in r.message
    assert judge_rope(stats([block(0, 3e-4, input_drift=6e-2)])).fix == FIX_NORM
    # one block's own fault is not hidden by another block's drifting input
    mixed = judge_rope(stats([block(0, 3e-4, input_drift=6e-2), block(2, 5e-2)]))
    assert mixed.consequence_of is None and "worst in block 2" in mixed.message
    assert judge_rope(stats([block(0, 3e-4, input_drift=6e-2)]), RopeLimits(tolerance=1e-3)).passed


def test_norm_eps_change_is_a_consequence_not_a_rope_fault():
    old, t = source("dense"), story_tokens()
    good = scale_bilaterally(old, 2, 1)
    bad = rebuild(replace(good.config, norm_eps=1e-6), good.state_dict())
    r = check_rope_integrity(old, bad, t)
    assert not r.passed and r.consequence_of == "block 0 (old block 0) attention_norm"
    assert "restore norm_eps" in r.fix and FIX_ROPE not in r.fix


def test_interleaved_attention_norm_is_a_consequence_with_the_norm_fix():
    old, t = source("dense"), story_tokens()
    bad = scale_bilaterally(old, 2, 0)
    with torch.no_grad():
        bad.blocks[1].attention_norm.weight.copy_(old.blocks[1].attention_norm.weight.repeat_interleave(2))
    r = check_rope_integrity(old, bad, t)
    assert not r.passed and r.consequence_of == "block 1 (old block 1) attention_norm" and r.fix == FIX_NORM


def test_permuted_rotary_pairs_remain_a_rope_fault():
    old, t = source("dense"), story_tokens()
    r = check_rope_integrity(old, permute_qk_pairs(copy.deepcopy(scale_bilaterally(old, 2, 1))), t)
    assert not r.passed and r.consequence_of is None and r.fix.startswith(FIX_ROPE)
    assert r.metrics["max_input_drift"] < 1e-12


# -------------------------------------------------------------------------- mutations: RoPE check
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

"""Tests of transfer/checks/rope.py: the judge on hand-made stats (no models), and the root-cause rule on real
growths: attention drift whose input already drifts (a changed norm) is reported as that drift's consequence."""
import copy
from dataclasses import replace

import torch

from tests.growth_pairs import permute_qk_pairs, rebuild, source, story_tokens
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

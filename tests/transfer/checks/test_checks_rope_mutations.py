"""The RoPE check against realistic broken growths (head_dim changed instead of heads, theta changed, rescaled tables,
rotary pairs permuted, GQA kv heads kept or interleaved, a shrunk max_seq_len): each fails RoPE with its fix while its
unbroken counterpart passes all five; MQA keeping its single kv head is no false alarm.
The judge: test_checks_rope.py."""
import copy
from dataclasses import replace

import pytest
import torch

from models.model import rope_tables
from tests.growth_pairs import (ROPE_FIX, TOL, assert_all_pass, assert_caught, kv_heads_kept, permute_qk_pairs, rebuild,
                                report, source)
from transfer.checks import FIX_ROPE, check_rope_integrity
from transfer.simple_growth import scale_bilaterally


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

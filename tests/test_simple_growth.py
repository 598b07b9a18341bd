import copy

import pytest
import torch

from config import ConfigError
from models import build_model, expert_load, load_entropy
from tests.conftest import tiny_config, tokens_for
from transfer.simple_growth import dense_to_moe, hyperclone_weight, layer_sources, scale_bilaterally


def rel_logit_drift(old, new, tokens, dtype=torch.float64) -> float:
    old, new = copy.deepcopy(old).to(dtype), copy.deepcopy(new).to(dtype)
    with torch.no_grad():
        a, b = old(tokens), new(tokens)
    return ((b - a).abs().max() / a.pow(2).mean().sqrt()).item()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ hyperclone_weight
def test_hyperclone_without_noise_is_the_tiling_rule():
    w = torch.randn(3, 5)
    assert torch.equal(hyperclone_weight(w, 2), w.repeat(2, 2) / 2)
    assert torch.equal(hyperclone_weight(w, 3, widen_out=False), w.repeat(1, 3) / 3)
    assert torch.equal(hyperclone_weight(w, 3, widen_in=False), w.repeat(3, 1))
    assert torch.equal(hyperclone_weight(torch.arange(3.0), 2), torch.tensor([0.0, 1, 2, 0, 1, 2]))


@pytest.mark.parametrize("s", [2, 3, 4])
def test_noise_sums_to_zero_over_input_copies_and_has_the_asked_size(s):
    w = torch.randn(64, 48, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    grown = hyperclone_weight(w, s, noise_std=0.3, generator=g)
    copies = grown.view(s * 64, s, 48)  # (out, input copy, in)
    assert torch.allclose(copies.sum(1), w.repeat(s, 1), atol=1e-12)  # cancels on tiled input
    noise = grown - w.repeat(s, s) / s
    ratio = noise.pow(2).mean().sqrt() / (w.pow(2).mean().sqrt() / s)
    assert 0.27 < ratio < 0.33
    assert not torch.allclose(copies[:64], copies[64:128])  # cloned output rows get different noise


def test_hyperclone_batched_expert_weights_widen_each_expert():
    w = torch.randn(4, 6, 5)
    grown = hyperclone_weight(w, 2)
    assert grown.shape == (4, 12, 10) and torch.equal(grown[2], w[2].repeat(2, 2) / 2)


def test_hyperclone_rejects_bad_arguments():
    with pytest.raises(ValueError, match="integer >= 1"):
        hyperclone_weight(torch.ones(2, 2), 0)
    with pytest.raises(ValueError, match="integer >= 1"):
        hyperclone_weight(torch.ones(2, 2), 1.5)
    with pytest.raises(ValueError, match="noise_std"):
        hyperclone_weight(torch.ones(2, 2), 2, noise_std=-1)


# ------------------------------------------------------------------------------------------ layer_sources
def test_layer_sources_spread_identity_blocks_after_their_sources():
    assert layer_sources(3, 0) == [(0, False), (1, False), (2, False)]
    assert layer_sources(4, 2) == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True)]
    for n, extra in [(2, 8), (4, 4), (5, 3), (1, 3)]:
        layout = layer_sources(n, extra)
        assert len(layout) == n + extra and [s for s, ins in layout if not ins] == list(range(n))
        assert sum(ins for _, ins in layout) == extra
        assert all(layout[i - 1][0] == src for i, (src, ins) in enumerate(layout) if ins)


# ------------------------------------------------------------------------------------------ dense_to_moe
def test_dense_to_moe_preserves_function_and_copies_ffn(tokens):
    torch.manual_seed(0)
    dense = build_model(tiny_config())
    before = state(dense)
    moe = dense_to_moe(dense, n_experts=4, top_k=2, seed=3)
    assert moe.config.n_experts == 4 and moe.config.top_k == 2 and not dense.config.is_moe
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    ffn = moe.blocks[1].ffn
    assert all(torch.equal(ffn.gate_proj[e], dense.blocks[1].ffn.gate_proj.weight) for e in range(4))
    assert ffn.router.weight.abs().min() > 0 and ffn.router.weight.std() < 0.05
    assert rel_logit_drift(dense, moe, tokens) < 1e-12
    assert rel_logit_drift(dense, moe, tokens, torch.float32) < 1e-5
    again = dense_to_moe(dense, n_experts=4, top_k=2, seed=3)
    assert torch.equal(again.blocks[0].ffn.router.weight, moe.blocks[0].ffn.router.weight)
    assert not torch.equal(dense_to_moe(dense, 4, 2, seed=4).blocks[0].ffn.router.weight, ffn.router.weight)


def test_dense_to_moe_calibrated_router_is_centred_and_balanced(tokens):
    torch.manual_seed(0)
    dense = build_model(tiny_config(dim=64))
    moe = dense_to_moe(dense, 8, 2, calibration_tokens=tokens)
    out = moe(tokens, return_details=True)
    for block, x, logits in zip(moe.blocks, out.hidden_states, out.router_logits):
        mean = block.ffn_norm(block.attention_residual(x, moe.rope_cos, moe.rope_sin)).flatten(0, 1).mean(0)
        assert (block.ffn.router.weight @ mean).abs().max() < 1e-5 * mean.norm()
        assert load_entropy(expert_load(logits, 2)) > 0.8
    assert rel_logit_drift(dense, moe, tokens) < 1e-12


def test_dense_to_moe_rejects_moe_input_and_bad_settings():
    moe = build_model(tiny_config(n_experts=2, top_k=1))
    with pytest.raises(ValueError, match="needs a dense model"):
        dense_to_moe(moe)
    with pytest.raises(ConfigError, match="top_k=5"):
        dense_to_moe(build_model(tiny_config()), n_experts=4, top_k=5)


# ------------------------------------------------------------------------------------- scale_bilaterally
@pytest.mark.parametrize("s", [1, 2, 3, 4])
@pytest.mark.parametrize("extra", [0, 1, 3, 8])
def test_bilateral_growth_is_exact(s, extra):
    torch.manual_seed(s * 10 + extra)
    old = dense_to_moe(build_model(tiny_config(n_kv_heads=2)), 4, 2, seed=1)
    tokens = tokens_for(2, 96)
    new = scale_bilaterally(old, scale_factor=s, extra_layers=extra, seed=extra)
    c = new.config
    assert (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.n_layers) == (32 * s, 4 * s, 2 * s, 8, 2 + extra)
    assert c.hidden_dim == old.config.hidden_dim * s and c.n_experts == 4
    assert rel_logit_drift(old, new, tokens) < 1e-6
    assert rel_logit_drift(old, new, tokens, torch.float32) < 1e-5
    hidden_old = copy.deepcopy(old).double()(tokens, return_details=True).hidden_states
    hidden_new = copy.deepcopy(new).double()(tokens, return_details=True).hidden_states
    for j, (src, _) in enumerate(layer_sources(2, extra)):  # every hidden vector is the old one tiled
        assert torch.allclose(hidden_new[j + 1], hidden_old[src + 1].repeat(1, 1, s), atol=1e-5)


def test_growth_does_not_mutate_its_input_nor_use_the_global_rng():
    old = build_model(tiny_config())
    old.train()
    before = state(old)
    rng = torch.get_rng_state()
    new = scale_bilaterally(old, 2, 2)
    assert torch.equal(rng, torch.get_rng_state())
    assert old.training and old.config.dim == 32 and len(old.blocks) == 2
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in before.items())
    assert new is not old and all(p.data_ptr() != q.data_ptr() for p in new.parameters() for q in old.parameters())


def test_tied_head_is_untied_and_the_embedding_is_not_rescaled():
    old = build_model(tiny_config())
    assert old.config.tie_embeddings
    new = scale_bilaterally(old, 2, 0)
    assert not new.config.tie_embeddings and new.lm_head.weight is not new.embed.weight
    assert torch.equal(new.embed.weight, old.embed.weight.repeat(1, 2))
    assert torch.equal(new.lm_head.weight, old.embed.weight.repeat(1, 2) / 2)
    same_width = scale_bilaterally(old, 1, 1)
    assert same_width.config.tie_embeddings and same_width.lm_head.weight is same_width.embed.weight


def test_inserted_blocks_are_exact_identities_copying_their_source():
    old = build_model(tiny_config(n_experts=4))
    new = scale_bilaterally(old, 2, 2, noise_std=0.0)
    for j, (src, inserted) in enumerate(layer_sources(2, 2)):
        b = new.blocks[j]
        if inserted:
            assert b.attention.o_proj.weight.abs().max() == 0 and b.ffn.down_proj.abs().max() == 0
            assert torch.equal(b.attention.q_proj.weight, new.blocks[j - 1].attention.q_proj.weight)
            x = torch.randn(2, 8, 64)
            assert torch.equal(b(x, new.rope_cos, new.rope_sin)[0], x)
        else:
            assert b.attention.o_proj.weight.abs().max() > 0


def test_noise_is_seeded_and_zero_noise_gives_pure_clones():
    old = build_model(tiny_config())
    a, b, c = (scale_bilaterally(old, 2, 0, seed=k) for k in (0, 0, 1))
    wa, wb, wc = (m.blocks[0].attention.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    pure = scale_bilaterally(old, 2, 0, noise_std=0.0).blocks[0].attention.q_proj.weight
    assert torch.equal(pure, old.blocks[0].attention.q_proj.weight.repeat(2, 2) / 2)


def test_growing_twice_stays_exact(tokens):
    torch.manual_seed(0)
    old = build_model(tiny_config(n_experts=4))
    twice = scale_bilaterally(scale_bilaterally(old, 2, 1), 2, 2, seed=5)
    assert twice.config.dim == 128 and twice.config.n_layers == 5
    assert rel_logit_drift(old, twice, tokens) < 1e-6


def test_inserted_routers_are_centred_on_their_own_input(tokens):
    torch.manual_seed(0)
    old = dense_to_moe(build_model(tiny_config(dim=64)), 8, 2, calibration_tokens=tokens)
    new = scale_bilaterally(old, 2, 2, calibration_tokens=tokens)
    out = new(tokens, return_details=True)
    for j, (_, inserted) in enumerate(layer_sources(2, 2)):
        if inserted:
            assert load_entropy(expert_load(out.router_logits[j], 2)) > 0.8
    assert rel_logit_drift(old, new, tokens) < 1e-6


def test_bad_growth_arguments_are_rejected_before_work():
    old = build_model(tiny_config())
    for kwargs, text in [(dict(scale_factor=0), "scale_factor=0"), (dict(extra_layers=-2), "extra_layers=-2"),
                         (dict(noise_std=-1.0), "noise_std=-1.0"), (dict(scale_factor=2.0), "scale_factor=2.0")]:
        with pytest.raises(ConfigError, match=text):
            scale_bilaterally(old, **kwargs)


def test_family_features_grow_by_their_rules():
    """q/k/v biases tile like their rows (heads copied, never divided, no noise); q/k norms act over head_dim and
    stay; explicit head_dim, sliding window and llama3 RoPE scaling carry over."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    small = build_model(tiny_config(qkv_bias=True, qk_norm=True, explicit_head_dim=12, sliding_window=7,
                                    rope_scaling=rope, n_kv_heads=2))
    with torch.no_grad():
        for p in small.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    small = small.double()
    big = scale_bilaterally(small, 3, 1, noise_std=0.3)
    c = big.config
    assert (c.head_dim, c.sliding_window, c.rope_scaling, c.n_heads, c.kv_heads) == (12, 7, rope, 12, 6)
    sa, ba = small.blocks[0].attention, big.blocks[0].attention
    for n in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(ba, n).bias, getattr(sa, n).bias.repeat(3)), n
    assert torch.equal(ba.q_norm.weight, sa.q_norm.weight) and torch.equal(ba.k_norm.weight, sa.k_norm.weight)
    tokens = tokens_for(2, 32)
    assert torch.allclose(big(tokens), small(tokens), atol=1e-10, rtol=0)

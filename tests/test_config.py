import pytest

from config import ConfigError, GrowthConfig, ModelConfig, TrainConfig
from training.settings import build_settings, parse_overrides


def test_defaults_derive_kv_heads_ffn_and_head_dim():
    cfg = ModelConfig(dim=96, n_heads=3)
    assert cfg.kv_heads == 3 and cfg.head_dim == 32 and cfg.hidden_dim % 32 == 0 and cfg.hidden_dim >= 8 * 96 // 3


def test_derived_sizes_follow_replace_and_overrides():
    """A derived value frozen at construction would silently survive replace(dim=...) (a GQA-by-accident trap)."""
    from dataclasses import replace

    small = replace(ModelConfig(), dim=64, n_heads=8)
    assert small.kv_heads == 8 and small.hidden_dim == 192 and small.head_dim == 8
    m = build_settings(None, parse_overrides(["--dim=64", "--n_heads=2"])).model
    assert m.kv_heads == 2 and m.hidden_dim == 192


@pytest.mark.parametrize("kwargs, text", [
    (dict(dim=100, n_heads=3), "n_heads=3 must divide dim=100"),
    (dict(dim=12, n_heads=4), "head_dim=3 must be even"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
    (dict(n_experts=4, top_k=5), "top_k=5 must be between 1 and n_experts=4"),
    (dict(n_experts=4, top_k=0), "top_k=0"),
    (dict(n_experts=-1), "n_experts=-1"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(vocab_size=0), "vocab_size=0"),
])
def test_invalid_model_config_is_rejected_with_the_reason(kwargs, text):
    with pytest.raises(ConfigError, match=text.replace("(", r"\(")):
        ModelConfig(**kwargs)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        ModelConfig(dim=100, n_heads=3, vocab_size=0)
    assert "vocab_size" in str(e.value) and "n_heads" in str(e.value)


@pytest.mark.parametrize("kwargs, text", [
    (dict(scale_factor=0), "scale_factor=0"), (dict(scale_factor=1.5), "scale_factor=1.5"),
    (dict(extra_layers=-1), "extra_layers=-1"), (dict(noise_std=-0.1), "noise_std=-0.1"),
    (dict(top_k=9), "top_k=9"), (dict(router_init_std=0.0), "router_init_std"),
])
def test_invalid_growth_config_is_rejected(kwargs, text):
    with pytest.raises(ConfigError, match=text):
        GrowthConfig(**kwargs)


def test_decay_schedule_is_validated():
    assert TrainConfig(decay="final_phase").decay == "final_phase"
    with pytest.raises(ConfigError, match="decay='cosine' must be every_phase or final_phase"):
        TrainConfig(decay="cosine")

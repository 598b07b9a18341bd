import pytest

from config import PRESETS, ConfigError
from training.settings import Settings, build_settings


def test_presets_build_valid_settings_and_overrides_win():
    for name in PRESETS:
        s = build_settings(name, [])
        assert s.train.seq_len <= s.model.max_seq_len and s.model.n_experts == 0
    s = build_settings("micro", ["--noise_std=0.1", "--n_experts=8", "--seed=7"])
    assert (s.growth.noise_std, s.growth.n_experts, s.run.seed, s.model.dim) == (0.1, 8, 7, 64)


def test_settings_round_trip_through_a_dict():
    s = build_settings("micro", [])
    assert Settings.from_dict(s.to_dict()) == s


def test_resume_keeps_the_model_but_allows_growth_and_training_knobs():
    saved = build_settings("micro", []).to_dict()
    s = build_settings(None, ["--noise_std=0.5", "--grown_steps=99"], saved)
    assert s.growth.noise_std == 0.5 and s.train.grown_steps == 99 and s.model.dim == 64
    with pytest.raises(ConfigError, match="cannot change on --resume"):
        build_settings(None, ["--dim=128"], saved)


@pytest.mark.parametrize("args, text", [
    (["--seq_len=500"], "exceeds max_seq_len"), (["--vocab_size=100"], ">= 257"),
    (["--vocab_size=70000"], "<= 65536"), (["--device=tpu"], "device='tpu'"),
])
def test_cross_section_rules(args, text):
    with pytest.raises(ConfigError, match=text):
        build_settings("micro", args)

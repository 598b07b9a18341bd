"""All of a run's settings in one object: preset, then saved settings (on resume), then command line."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

import torch

from config import (PRESETS, ConfigError, DataConfig, GrowthConfig, ModelConfig, RunConfig, TrainConfig,
                    apply_overrides, config_to_dict, settings_to_args)

SECTIONS = ("run", "growth", "model", "train", "data")  # override order: a shared name goes to the first


@dataclass
class Settings:
    run: RunConfig
    growth: GrowthConfig
    model: ModelConfig  # the phase-1 dense model
    train: TrainConfig
    data: DataConfig

    def configs(self) -> tuple:
        return tuple(getattr(self, s) for s in SECTIONS)

    def to_dict(self) -> dict:
        return {s: config_to_dict(getattr(self, s)) for s in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        types = dict(run=RunConfig, growth=GrowthConfig, model=ModelConfig, train=TrainConfig, data=DataConfig)
        return cls(**{s: types[s](**d[s]) for s in SECTIONS})


def default_preset() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_settings(preset: str | None, overrides: list[str], saved: dict | None = None) -> Settings:
    """Defaults <- preset (or the saved run's settings) <- --name=value overrides, validated together."""
    if saved is not None:
        base = Settings.from_dict(saved)
        model_overrides = [a for a in overrides if a[2:].split("=", 1)[0] in {f.name for f in fields(ModelConfig)}
                           and a[2:].split("=", 1)[0] not in ("n_experts", "top_k")]
        if model_overrides:
            raise ConfigError(f"{' '.join(model_overrides)}: the model of an existing run cannot change on "
                              "--resume; start a new run in another --out-dir")
    else:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base = Settings(RunConfig(), GrowthConfig(), ModelConfig(), TrainConfig(), DataConfig())
        base = Settings(*apply_overrides(settings_to_args(PRESETS[preset]), *base.configs()))
    settings = Settings(*apply_overrides(overrides, *base.configs()))
    check_consistency(settings)
    return settings


def check_consistency(s: Settings) -> None:
    """Rules that span sections, reported together."""
    p = []
    if s.train.seq_len > s.model.max_seq_len:
        p.append(f"seq_len={s.train.seq_len} exceeds max_seq_len={s.model.max_seq_len}")
    if s.model.n_experts:
        p.append(f"n_experts={s.model.n_experts} in the model: phase 1 is dense; set the MoE with --n_experts (growth)")
    if s.model.vocab_size < 257:
        p.append(f"vocab_size={s.model.vocab_size} must be >= 257 (byte-level BPE: 256 bytes + end of text)")
    if s.model.vocab_size > 65536:
        p.append(f"vocab_size={s.model.vocab_size} must be <= 65536 (tokens are cached as uint16)")
    if p:
        raise ConfigError("; ".join(p))


def save_settings(settings: Settings, out_dir: str) -> None:
    from training.checkpoint import write_text_atomic

    write_text_atomic(os.path.join(out_dir, "settings.json"), json.dumps(settings.to_dict(), indent=1))


def load_saved_settings(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, "settings.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)

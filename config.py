"""Typed, validated configuration. Every knob of the project lives here, grouped by what it configures.

A config is validated when it is built: every problem is collected into one ValueError, so a bad value
is reported before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A configuration value is invalid; the message lists every problem and how to fix it."""


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ConfigError(f"invalid {what}: " + "; ".join(problems))


@dataclass
class ModelConfig:
    """One decoder for every phase: `n_experts == 0` is the dense model, `n_experts > 0` the MoE."""

    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head); fewer = grouped-query attention
    ffn_dim: int | None = None  # SwiGLU hidden size per expert; None = 8/3 * dim rounded up to 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_experts: int = 0  # 0 = dense SwiGLU FFN
    top_k: int = 2  # experts per token (MoE only)
    tie_embeddings: bool = True  # LM head shares the embedding matrix

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = -(-(8 * self.dim // 3) // 32) * 32
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def validate(self) -> None:
        p: list[str] = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_heads >= 1 and self.dim % self.n_heads:
            p.append(f"n_heads={self.n_heads} must divide dim={self.dim} (head_dim = dim // n_heads)")
        elif self.n_heads >= 1 and self.head_dim % 2:
            p.append(f"head_dim={self.head_dim} must be even for RoPE: choose n_heads so dim // n_heads is even")
        if self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads:
            p.append(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if not self.rope_theta > 0:
            p.append(f"rope_theta={self.rope_theta} must be > 0")
        if not self.norm_eps > 0:
            p.append(f"norm_eps={self.norm_eps} must be > 0")
        if self.n_experts < 0:
            p.append(f"n_experts={self.n_experts} must be >= 0 (0 = dense)")
        if self.n_experts > 0 and not 1 <= self.top_k <= self.n_experts:
            p.append(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        _raise_if(p, "ModelConfig")


@dataclass
class GrowthConfig:
    """The two transitions: dense -> MoE (sparse upcycling) and bilateral growth (width x depth)."""

    n_experts: int = 8
    top_k: int = 2
    router_init_std: float = 0.02  # small random router: a zero router sends every token to the same experts
    scale_factor: int = 2  # width multiplier (integer >= 1); heads multiply, head_dim stays
    extra_layers: int = 4  # identity blocks inserted (>= 0)
    noise_std: float = 0.3  # symmetry-breaking noise, relative to each block's RMS (0.32 = 10 dB SNR)
    seed: int = 0

    def __post_init__(self) -> None:
        p: list[str] = []
        if self.n_experts < 1:
            p.append(f"n_experts={self.n_experts} must be >= 1")
        elif not 1 <= self.top_k <= self.n_experts:
            p.append(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if not self.router_init_std > 0:
            p.append(f"router_init_std={self.router_init_std} must be > 0 (a zero router collapses routing)")
        if isinstance(self.scale_factor, bool) or not isinstance(self.scale_factor, int) or self.scale_factor < 1:
            p.append(f"scale_factor={self.scale_factor!r} must be an integer >= 1")
        if isinstance(self.extra_layers, bool) or not isinstance(self.extra_layers, int) or self.extra_layers < 0:
            p.append(f"extra_layers={self.extra_layers!r} must be an integer >= 0")
        if not self.noise_std >= 0:
            p.append(f"noise_std={self.noise_std} must be >= 0")
        _raise_if(p, "GrowthConfig")


def config_to_dict(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def _convert(raw: str, current, name: str):
    """Parse raw to the type of the field's current value (nanoGPT's rule: no type changes)."""
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}={raw}: expected true or false")
    for typ in (int, float):
        if isinstance(current, typ):
            try:
                return typ(raw)
            except ValueError:
                raise ConfigError(f"--{name}={raw}: expected {'an integer' if typ is int else 'a number'}") from None
    if current is None and raw.lower() in ("none", "null"):
        return None
    if current is None:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"--{name}={raw}: expected an integer or none") from None
    return raw


def apply_overrides(args: list[str], *configs):
    """Apply `--name=value` arguments to the first of `configs` that has that field; return new, validated configs.

    An unknown name, a malformed value or a value the config rejects raises ConfigError before any work.
    """
    from dataclasses import replace

    updates: list[dict] = [{} for _ in configs]
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"{arg!r}: overrides are written --name=value")
        name, raw = arg[2:].split("=", 1)
        owners = [i for i, c in enumerate(configs) if name in {f.name for f in fields(c)}]
        if not owners:
            known = sorted({f.name for c in configs for f in fields(c)})
            raise ConfigError(f"unknown setting --{name}; known: {', '.join(known)}")
        updates[owners[0]][name] = _convert(raw, getattr(configs[owners[0]], name), name)
    return tuple(replace(c, **u) if u else c for c, u in zip(configs, updates))

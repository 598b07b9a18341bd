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

    vocab_size: int = 4096  # BPE vocabulary the tokenizer is trained to (256 bytes + end of text + merges)
    dim: int = 256  # residual-stream width of the phase-1 model (growth multiplies it by scale_factor)
    n_layers: int = 4  # transformer blocks of the phase-1 model (growth adds extra_layers)
    n_heads: int = 4  # attention heads; head_dim = dim // n_heads (growth multiplies heads, keeps head_dim)
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head); fewer = grouped-query attention
    ffn_dim: int | None = None  # SwiGLU hidden size per expert; None = 8/3 * dim rounded up to 32
    max_seq_len: int = 256  # longest context the RoPE tables cover
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    n_experts: int = 0  # 0 = dense SwiGLU FFN
    top_k: int = 2  # experts per token (MoE only)
    tie_embeddings: bool = True  # LM head shares the embedding matrix
    # Features of the transformers families read and written exactly (transfer/hf_format.py); the defaults are the
    # project's own Llama-style model. Growth keeps each of them (transfer/simple_growth.py says how).
    explicit_head_dim: int | None = None  # None = dim // n_heads; Qwen3 sets a head_dim that need not be dim / heads
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2); o_proj and the FFN never have one
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
    sliding_window: int | None = None  # None = full causal attention; W: a token sees itself and W-1 before (Mistral)
    # None = plain RoPE; Llama 3's scaled frequencies as {"rope_type": "llama3", "factor": 8.0, "low_freq_factor":
    # 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} (the keys transformers writes)
    rope_scaling: dict | None = None  # Llama 3's RoPE frequency scaling (config.py lists the keys), None = plain RoPE

    def __post_init__(self) -> None:
        self.validate()

    # Derived sizes are properties, not values filled in at construction, so that replace(cfg, dim=...) or
    # an override of n_heads re-derives them instead of silently keeping the old ones.
    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim if self.explicit_head_dim is not None else self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim if self.ffn_dim is not None else -(-(8 * self.dim // 3) // 32) * 32

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def validate(self) -> None:
        p: list[str] = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len",
                     "explicit_head_dim", "sliding_window"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.explicit_head_dim is not None:
            if self.explicit_head_dim >= 1 and self.explicit_head_dim % 2:
                p.append(f"explicit_head_dim={self.explicit_head_dim} must be even for RoPE")
        elif self.n_heads >= 1 and self.dim % self.n_heads:
            p.append(f"n_heads={self.n_heads} must divide dim={self.dim} (head_dim = dim // n_heads)")
        elif self.n_heads >= 1 and self.head_dim % 2:
            p.append(f"head_dim={self.head_dim} must be even for RoPE: choose n_heads so dim // n_heads is even")
        p.extend(rope_scaling_problems(self.rope_scaling))
        if self.kv_heads >= 1 and self.n_heads >= 1 and self.n_heads % self.kv_heads:
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


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_scaling_problems(rope_scaling) -> list[str]:
    """What is wrong with a rope_scaling value (None, or Llama 3's dict with its four numbers), one item each."""
    if rope_scaling is None:
        return []
    if not isinstance(rope_scaling, dict):
        return [f"rope_scaling={rope_scaling!r} must be none or Llama 3's dict (rope_type llama3 and "
                f"{', '.join(LLAMA3_ROPE_KEYS)})"]
    p = []
    if rope_scaling.get("rope_type") != "llama3":
        p.append(f"rope_scaling rope_type={rope_scaling.get('rope_type')!r} must be 'llama3' (the one supported)")
    for key in LLAMA3_ROPE_KEYS:
        value = rope_scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            p.append(f"rope_scaling {key}={value!r} must be a number > 0")
    unknown = sorted(set(rope_scaling) - {"rope_type", *LLAMA3_ROPE_KEYS})
    if unknown:
        p.append(f"rope_scaling has keys {unknown} that llama3 scaling does not read")
    low, high = rope_scaling.get("low_freq_factor"), rope_scaling.get("high_freq_factor")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not high > low:
        p.append(f"rope_scaling high_freq_factor={high} must be > low_freq_factor={low}")
    return p


@dataclass
class GrowthConfig:
    """The two transitions: dense -> MoE (sparse upcycling) and bilateral growth (width x depth)."""

    n_experts: int = 8  # experts per MoE layer made by upcycling (each a copy of the dense FFN)
    top_k: int = 2  # experts each token is routed to
    router_init_std: float = 0.02  # small random router: a zero router sends every token to the same experts
    scale_factor: int = 2  # width multiplier (integer >= 1); heads multiply, head_dim stays
    extra_layers: int = 4  # identity blocks inserted (>= 0)
    noise_std: float = 0.3  # symmetry-breaking noise, relative to each block's RMS (0.32 = 10 dB SNR)
    halt_on_relock: bool = False  # halt phase 3 (not only warn) when cloned units stop diverging or re-lock

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


@dataclass
class TrainConfig:
    """Per-phase training. Each phase starts a fresh AdamW (moments do not map through growth) with warm-up.

    A pipeline stage named X (training/stages.py) trains for X_steps at peak learning rate X_lr.
    """

    batch_size: int = 16  # sequences per micro-batch per process; a step sees batch_size x grad_accum_steps x processes
    grad_accum_steps: int = 1  # micro-batches summed into each optimizer step (same optimisation, less memory)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1/3 more compute)
    seq_len: int = 256  # tokens per sequence, <= max_seq_len
    dense_steps: int = 1000  # optimizer steps of phase 1 (the dense model)
    moe_steps: int = 500  # optimizer steps of phase 2 (the upcycled MoE)
    grown_steps: int = 500  # optimizer steps of phase 3 (the grown MoE)
    dense_lr: float = 2e-3  # peak learning rate of phase 1
    moe_lr: float = 1e-3  # peak learning rate of phase 2
    # moe_lr / scale_factor (set it again for another scale_factor): growth divides fan-in weights by s but Adam's
    # step does not shrink, so the same LR moves the grown model s times as far (TinyStories, s=2, default schedule:
    # 6e-4 lifted eval loss by 0.014 right after growth, 3e-4 not at all).
    grown_lr: float = 3e-4  # peak learning rate of phase 3 (moe_lr / scale_factor: config.py says why)
    warmup_steps: int = 50  # per phase
    min_lr_ratio: float = 0.1  # cosine decay to min_lr_ratio * lr
    # final_phase: phases 1-2 hold their LR after warm-up and only phase 3 decays (warmup-stable-decay).
    # every_phase: each phase decays (cosine), so each next phase re-warms a decayed model, which costs loss:
    # on TinyStories (bench/growth_vs_scratch.py) final eval loss 2.49 against 2.63 at equal FLOPs.
    decay: str = "final_phase"  # final_phase | every_phase: which phases decay their LR (config.py says why)
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only (not norm weights)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    balance_coef: float = 0.01  # Switch load-balancing loss (reads 1.0 at perfect balance)
    z_coef: float = 0.001  # router z-loss
    eval_interval: int = 100  # steps between evaluations on the held-out stories (and at each phase end)
    eval_batches: int = 10  # held-out batches per evaluation
    log_interval: int = 10  # steps between logged training losses
    checkpoint_interval: int = 250  # steps between checkpoints (and at each phase end)
    keep_checkpoints: int = 2  # periodic checkpoints kept besides every phase-end one (0 = phase ends only)
    sample_tokens: int = 150  # length of the story sampled at each phase end

    def __post_init__(self) -> None:
        p: list[str] = []
        stage_steps = [f.name for f in fields(self) if f.name.endswith("_steps") and f.name != "warmup_steps"]
        for name in ("batch_size", "grad_accum_steps", "seq_len", *stage_steps, "eval_interval", "eval_batches", "log_interval",
                     "checkpoint_interval"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in (f.name for f in fields(self) if f.name.endswith("_lr")):
            if not getattr(self, name) > 0:
                p.append(f"{name}={getattr(self, name)} must be > 0")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "balance_coef", "z_coef", "sample_tokens",
                     "keep_checkpoints"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.decay not in ("every_phase", "final_phase"):
            p.append(f"decay={self.decay!r} must be every_phase or final_phase")
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"min_lr_ratio={self.min_lr_ratio} must be between 0 and 1")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            p.append(f"beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")
        _raise_if(p, "TrainConfig")


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenised (the tokenizer's vocab is ModelConfig.vocab_size)."""

    val_fraction: float = 0.05  # stories held out for eval loss when the source has no validation split
    max_stories: int = 0  # cap on training stories (0 = all)
    offline_stories: int = 20000  # generated stories when neither the hub nor files are available

    def __post_init__(self) -> None:
        p: list[str] = []
        if not 0 < self.val_fraction < 1:
            p.append(f"val_fraction={self.val_fraction} must be between 0 and 1")
        if self.max_stories < 0:
            p.append(f"max_stories={self.max_stories} must be >= 0 (0 = all)")
        if self.offline_stories < 10:
            p.append(f"offline_stories={self.offline_stories} must be >= 10")
        _raise_if(p, "DataConfig")


@dataclass
class RunConfig:
    """Where and how the run executes."""

    seed: int = 1337  # one seed for the run: init, data order, growth noise, routers, samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # compile: measured on CPU (micro, 1 thread, before issue 20): dense step 27 ms compiled vs 104 ms eager after a
    # 63 s compile; MoE 238 vs 152 ms while its expert loop ran eagerly between compiled graphs. Since issue 20 the
    # dense and MoE steps compile as one graph (grouped_mm in bf16, the expert op elsewhere), so a compiled MoE step
    # no longer pays graph breaks. Off by default everywhere until bench/gpu_check.sh's phases_eager against
    # phases_compiled is measured on a GPU (none lent yet); the roofline (training/roofline.py) predicts compile
    # lifts the cuda preset's MFU from 14/14/26% to 24/23/39% on an H100, a prediction only.
    compile: bool = False  # torch.compile the training model (first step of each phase compiles: about a minute on CPU)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 (autocast, CPU too) | fp32
    tensorboard: bool = False  # also write TensorBoard scalars to out_dir/tensorboard (pip install tensorboard)
    # Under torchrun, ddp keeps a whole replica (weights, gradients, AdamW: 16 bytes a parameter) on every process;
    # fsdp (PyTorch's FSDP2) shards them over the processes, 1/world each, at the cost of gathering each block's
    # weights in forward and backward. Either resumes the other's checkpoints, on any number of processes.
    parallel: str = "ddp"  # ddp (a replica per process) | fsdp (weights, gradients, AdamW sharded; config.py says why)

    def __post_init__(self) -> None:
        p: list[str] = []
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            p.append(f"device={self.device!r} must be auto, cpu, cuda or cuda:N")
        if self.parallel not in PARALLEL:
            p.append(f"parallel={self.parallel!r} must be one of {', '.join(PARALLEL)}")
        if self.precision not in PRECISIONS:
            p.append(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        _raise_if(p, "RunConfig")


PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")


# Named presets: overrides on top of the dataclass defaults. `micro` is the smallest run that exercises
# everything (tests use it); `cpu` trains readable little stories in 15-45 minutes on 2 cores; `cuda`
# is sized for one modern GPU.
PRESETS: dict[str, dict[str, object]] = {
    "micro": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=128, seq_len=64, batch_size=8,
                  dense_steps=30, moe_steps=20, grown_steps=20, warmup_steps=5, eval_interval=10,
                  eval_batches=2, log_interval=5, checkpoint_interval=15, n_experts=4, top_k=2,
                  scale_factor=2, extra_layers=2, offline_stories=2000, max_stories=2000, sample_tokens=40),
    "cpu": dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, max_seq_len=256, seq_len=256, batch_size=16,
                dense_steps=1200, moe_steps=400, grown_steps=250, n_experts=4, top_k=2, scale_factor=2,
                extra_layers=2, eval_interval=100, checkpoint_interval=200),
    # cuda: sized for its data (README, "The cuda preset"): the grown MoE's 36.5M active parameters see 367M phase-3
    # tokens (10 per active parameter), all phases 442M tokens, under one pass over TinyStories (~470M tokens at
    # vocab 4096: 0.247 tokens per byte of 1.9 GB); peak memory well under 24 GB (python train_tinystories.py --plan).
    "cuda": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, max_seq_len=512, seq_len=512, batch_size=64,
                 dense_steps=1500, moe_steps=800, grown_steps=11200, n_experts=8, top_k=2, scale_factor=2,
                 extra_layers=2, dense_lr=1e-3, moe_lr=6e-4, grown_lr=3e-4, warmup_steps=200,
                 eval_interval=250, eval_batches=20, checkpoint_interval=1000, max_stories=0),
}


def config_to_dict(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}

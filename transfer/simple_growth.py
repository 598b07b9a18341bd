"""Function-preserving growth operators: pure functions from a model to a new, larger model.

    moe = dense_to_moe(dense, n_experts=8, top_k=2)          # sparse upcycling, same function
    big = scale_bilaterally(moe, scale_factor=2, extra_layers=4)  # width x2 (HyperCloning) + 4 identity blocks

Width rule (HyperCloning): every hidden vector of the grown model is the old one tiled, [h, h, ..., h].
A Linear weight [out, in] becomes W.repeat(s, s) / s (input widened => divide by s); the LM head and the
router widen their input only, W.repeat(1, s) / s; the embedding tiles its columns without division and
RMSNorm weights tile. Heads multiply (new head j + H*c copies head j) and head_dim stays, so RoPE stays
valid. Noise that sums to zero over the input copies of each output block breaks the symmetry between
cloned units while cancelling exactly on tiled input. See VERIFICATION_SUMMARY.md for the formulas.

The families' features (config.py): a q/k/v bias tiles like the rows it belongs to (no division: it is added
after the sum over the input; no noise: there is no input side for it to cancel on); q_norm/k_norm weights act
over head_dim, which stays, so they stay as they are; explicit head_dim, sliding window and RoPE scaling carry
over unchanged. An inserted identity block copies its source's biases and q/k norms: with o_proj and down_proj
zero they cannot reach the residual stream.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from config import GrowthConfig, ModelConfig
from models import model_holding

# How each parameter widens, by its name's last component: (widen_out, widen_in, symmetry_noise).
# Noise goes where the output units are clones (heads, FFN neurons, residual copies); the LM head's and
# the router's outputs (vocabulary, experts) are not cloned, so they need none.
WIDTH_RULES: dict[str, tuple[bool, bool, bool]] = {
    "q_proj": (True, True, True),
    "k_proj": (True, True, True),
    "v_proj": (True, True, True),
    "o_proj": (True, True, True),
    "gate_proj": (True, True, True),
    "up_proj": (True, True, True),
    "down_proj": (True, True, True),
    "router": (False, True, False),
    "lm_head": (False, True, False),
}

HEAD_DIM_NORMS = ("attention.q_norm.weight", "attention.k_norm.weight")  # RMSNorm over head_dim (Qwen3)


def hyperclone_weight(
    w: Tensor,
    scale_factor: int,
    *,
    widen_out: bool = True,
    widen_in: bool = True,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Widen one weight whose last two dims are [out, in] (leading dims are a batch, e.g. experts).

    A 1-D tensor (RMSNorm weight) is tiled. Where the input widens, the s input copies of each output
    block are W/s + eta_c with sum_c eta_c = 0, so the output on tiled input is exactly W x; `noise_std`
    is eta's standard deviation relative to the block's RMS (|W|_rms / s). Computed in float64.
    """
    s = scale_factor
    if not isinstance(s, int) or isinstance(s, bool) or s < 1:
        raise ValueError(f"scale_factor={s!r} must be an integer >= 1")
    if noise_std < 0:
        raise ValueError(f"noise_std={noise_std} must be >= 0")
    if w.dim() == 1:
        return w.repeat(s) if widen_out else w.clone()
    x = w.detach().double()
    x = x.repeat(*([1] * (x.dim() - 2)), s if widen_out else 1, s if widen_in else 1)
    if not widen_in:
        return x.to(w.dtype)
    x = x / s
    if noise_std > 0 and s > 1:
        out, in_ = x.shape[-2], w.shape[-1]
        eta = torch.randn(*x.shape[:-2], out, s, in_, generator=generator, dtype=torch.float64).to(x.device)
        eta = (eta - eta.mean(dim=-2, keepdim=True)) * (s / (s - 1)) ** 0.5  # zero-sum, unit variance
        block_rms = w.detach().double().pow(2).mean().sqrt() / s
        x = x + noise_std * block_rms * eta.reshape(x.shape)
    return x.to(w.dtype)


def layer_sources(n_layers: int, extra_layers: int) -> list[tuple[int, bool]]:
    """For each block of the deepened model: (index of the original block it copies, is_inserted).

    The extra identity blocks are spread evenly (as LLaMA-Pro does): one after every n_layers/extra
    original blocks, each a copy of the original block just before it.
    """
    after = [-(-(i + 1) * n_layers // extra_layers) - 1 for i in range(extra_layers)]  # ceil, so the last goes last
    layout: list[tuple[int, bool]] = []
    for i in range(n_layers):
        layout.append((i, False))
        layout.extend((i, True) for _ in range(after.count(i)))
    return layout


def _generator(seed: int) -> torch.Generator:
    """Noise and router init draw on the CPU from their own generator: same weights on any device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def dense_to_moe(
    dense_model: nn.Module,
    n_experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
    router_init_std: float = 0.02,
    calibration_tokens: Tensor | None = None,
) -> nn.Module:
    """Sparse upcycling: every expert a copy of the dense FFN, router N(0, router_init_std^2).

    The output equals the dense model's: identical experts and combine weights that sum to 1. The LM loss
    gives the router no gradient while the experts are identical; the balance and z losses move it from the
    first step, and the experts drift apart because each is trained on the tokens routed to it.

    A trained model's normalised hidden states share a large mean direction, so a plain random router sends
    nearly every token to the same top-k experts. Given calibration_tokens (B, T), each router's rows are
    made orthogonal to its layer's mean input on that batch: routing then follows what differs between
    tokens and starts balanced. Any router is function-preserving here, since the experts are identical.
    """
    old_cfg = dense_model.config
    if old_cfg.is_moe:
        raise ValueError(f"dense_to_moe needs a dense model; this one already has {old_cfg.n_experts} experts")
    GrowthConfig(n_experts=n_experts, top_k=top_k, router_init_std=router_init_std)  # validates
    new_cfg = replace(old_cfg, n_experts=n_experts, top_k=top_k)
    state = {}
    for name, t in dense_model.state_dict().items():
        if ".ffn." in name:  # blocks.i.ffn.gate_proj.weight [F, D] -> blocks.i.ffn.gate_proj [E, F, D]
            state[name.removesuffix(".weight")] = t.unsqueeze(0).repeat(n_experts, 1, 1)
        else:
            state[name] = t.clone()
    gen = _generator(seed)
    for i in range(new_cfg.n_layers):
        router = torch.randn(n_experts, new_cfg.dim, generator=gen, dtype=torch.float64) * router_init_std
        state[f"blocks.{i}.ffn.router.weight"] = router.to(next(dense_model.parameters()))
    new_model = model_holding(new_cfg, state)
    if calibration_tokens is not None:
        _center_routers(new_model, calibration_tokens)
    return new_model


@torch.no_grad()
def _center_routers(model: nn.Module, tokens: Tensor, layers: list[int] | None = None) -> None:
    """Remove from the routers' rows (of `layers`, default all) the component along their mean input on `tokens`.

    Only valid where the router cannot change the function: identical experts, or an identity block.
    """
    hidden = model(tokens.to(model.embed.weight.device), return_details=True).hidden_states
    for i, (block, x) in enumerate(zip(model.blocks, hidden)):
        if layers is not None and i not in layers:
            continue
        h = block.attention_residual(x, model.rope_cos, model.rope_sin)
        mean = block.ffn_norm(h).flatten(0, 1).double().mean(dim=0)
        u = mean / mean.norm().clamp(min=1e-30)
        w = block.ffn.router.weight
        w.copy_(w.double() - (w.double() @ u)[:, None] * u[None, :])


def grown_config(cfg: ModelConfig, scale_factor: int, extra_layers: int) -> ModelConfig:
    """Width x s with heads (and KV heads) x s and head_dim fixed; depth + extra_layers.

    A tied LM head is untied when the width grows: the embedding tiles without division while the head
    divides by s, so one shared tensor cannot be both.
    """
    s = scale_factor
    return replace(
        cfg,
        dim=cfg.dim * s,
        n_heads=cfg.n_heads * s,
        n_kv_heads=cfg.kv_heads * s,
        ffn_dim=cfg.hidden_dim * s,
        n_layers=cfg.n_layers + extra_layers,
        tie_embeddings=cfg.tie_embeddings and s == 1,
    )


def _widen_state(old_model: nn.Module, s: int, noise_std: float, gen: torch.Generator) -> dict[str, Tensor]:
    """Every tensor of old_model widened by s, under the names of the same-depth model."""
    state = {}
    for name, p in old_model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        key = parts[-2] if parts[-1] == "weight" else parts[-1]
        if name == "embed.weight":  # [V, D]: a Linear from one-hot to D, widened on its output only
            state[name] = hyperclone_weight(p.t(), s, widen_out=True, widen_in=False).t().contiguous()
        elif name.endswith(HEAD_DIM_NORMS):  # over head_dim, shared by every head: heads multiply, head_dim stays
            state[name] = p.detach().clone()
        elif name.endswith(".bias"):  # q/k/v: tiled like the weight's rows (heads copied), never divided, no noise
            state[name] = hyperclone_weight(p, s, widen_out=True)
        elif p.dim() == 1:  # RMSNorm weights: RMS of [x, x] equals RMS of x
            state[name] = hyperclone_weight(p, s)
        else:
            out, in_, noisy = WIDTH_RULES[key]
            std = noise_std if noisy else 0.0
            state[name] = hyperclone_weight(p, s, widen_out=out, widen_in=in_, noise_std=std, generator=gen)
    return state


def _deepen_state(state: dict[str, Tensor], layout: list[tuple[int, bool]]) -> dict[str, Tensor]:
    """Renumber blocks per `layout`; an inserted block copies its source with its output projections zeroed.
    An original block keeps `state`'s tensors themselves (the caller's to give); an inserted one gets copies.

    A pre-norm block whose attention o_proj and FFN down_proj (every expert's) are zero adds nothing to
    the residual stream: it is an exact identity, whatever its other weights.
    """
    new_state = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for new_i, (src, inserted) in enumerate(layout):
        prefix = f"blocks.{src}."
        for k, v in state.items():
            if k.startswith(prefix):
                suffix = k[len(prefix):]
                zero = inserted and suffix.startswith(("attention.o_proj", "ffn.down_proj"))
                new_state[f"blocks.{new_i}.{suffix}"] = torch.zeros_like(v) if zero else v.clone() if inserted else v
    return new_state


def scale_bilaterally(
    old_model: nn.Module,
    scale_factor: int = 2,
    extra_layers: int = 4,
    noise_std: float = 0.3,
    seed: int = 0,
    calibration_tokens: Tensor | None = None,
) -> nn.Module:
    """Width x scale_factor (HyperCloning with cancelling noise) and extra_layers identity blocks.

    noise_std is relative to each weight block's RMS (0.3 is about 10 dB signal-to-noise, Apple's choice);
    0 gives pure clones, which never diverge. An inserted MoE block's router is a copy of its source's but
    reads a different input (its source's output), where it may send every token to the same experts;
    given calibration_tokens it is centred on that input, as dense_to_moe does (free: the block is an
    identity, so its routing cannot change the function). The input model is not modified.
    """
    GrowthConfig(scale_factor=scale_factor, extra_layers=extra_layers, noise_std=noise_std)  # validates
    old_cfg = old_model.config
    new_cfg = grown_config(old_cfg, scale_factor, extra_layers)
    state = _widen_state(old_model, scale_factor, noise_std, _generator(seed))
    layout = layer_sources(old_cfg.n_layers, extra_layers)
    state = _deepen_state(state, layout)
    new_model = model_holding(new_cfg, state)
    inserted = [i for i, (_, is_new) in enumerate(layout) if is_new]
    if calibration_tokens is not None and new_cfg.is_moe and inserted:
        _center_routers(new_model, calibration_tokens, inserted)
    return new_model

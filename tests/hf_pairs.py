"""Grown pairs made the way public tools make them, from their published recipes (facts, not their code), with
transformers models built from configs (random weights moved off init, nothing downloaded):

    llama_pro(small, every=k)        LLaMA-Pro block expansion: a copy of the last block of every group of k
                                     placed after it, its o_proj and down_proj zeroed
    upcycle(small, n_experts, gate)  mergekit-moe / Megatron upcycling: a Mixtral whose experts are copies of the
                                     MLP; router "random" or "hidden" (rows from hidden states of prompts)
    hyperclone(small, s, heads=...)  HyperCloning width growth: W.repeat(s, s) / s with noise cancelling over the
                                     input copies, heads tiled (Apple's clone_matrix) or interleaved per head

Each returns a state dict and config for the BIG model; save() writes it with transformers' save_pretrained.
"""
from __future__ import annotations

import copy

import torch

from data.synthetic import byte_token_batch

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False, head_dim=8)


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**(TINY | overrides))


def build(config, seed: int = 0):
    """A transformers model from its config, every weight moved off init (norms away from 1), seeded."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else p + 0.02 * torch.randn_like(p))
    return model.eval()


def from_state(config, state: dict):
    """A transformers model of `config` holding exactly `state` (every key set)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings], (
        missing, unexpected)
    return model.eval()


def save(model, path: str) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return path


def _layer(state: dict, i: int) -> dict:
    p = f"model.layers.{i}."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def llama_pro(small, every: int = 2, zero=("self_attn.o_proj", "mlp.down_proj")):
    """LLaMA-Pro: after every `every` blocks, a copy of the last of them with the `zero` weights zeroed."""
    cfg, sd = copy.deepcopy(small.config), small.state_dict()
    n = cfg.num_hidden_layers
    out = {k: v.clone() for k, v in sd.items() if not k.startswith("model.layers.")}
    j = 0
    for i in range(n):
        for suffix, v in _layer(sd, i).items():
            out[f"model.layers.{j}.{suffix}"] = v.clone()
        j += 1
        if (i + 1) % every == 0:
            for suffix, v in _layer(sd, i).items():
                zeroed = suffix.removesuffix(".weight") in zero
                out[f"model.layers.{j}.{suffix}"] = torch.zeros_like(v) if zeroed else v.clone()
            j += 1
    cfg.num_hidden_layers = j
    return from_state(cfg, out)


def _ffn_inputs(small, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the MLP's input (post-attention RMSNorm of the residual) on tokens: (N, D)."""
    seen = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(o.detach().flatten(0, 1)))
             for layer in small.model.layers]
    with torch.no_grad():
        small(tokens)
    for h in hooks:
        h.remove()
    return seen


def upcycle(small, n_experts: int = 4, top_k: int = 2, gate: str = "random", text: str = "", seed: int = 0):
    """A Mixtral whose every expert copies the MLP; router rows N(0, 0.02) ("random", Megatron / mergekit) or the
    normalised mean MLP input of one prompt per expert ("hidden", mergekit), "zero" for a broken variant."""
    from transformers import MixtralConfig

    c = small.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                        max_position_embeddings=c.max_position_embeddings, rope_parameters=dict(c.rope_parameters),
                        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                        num_local_experts=n_experts, num_experts_per_tok=top_k, sliding_window=None)
    sd = small.state_dict()
    out = {k: v.clone() for k, v in sd.items() if ".mlp." not in k}
    gen = torch.Generator().manual_seed(seed)
    hidden = None
    if gate == "hidden":
        prompts = byte_token_batch(text, n_experts, 32) % c.vocab_size
        hidden = [h.view(n_experts, 32, -1).mean(1) for h in _ffn_inputs(small, prompts)]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        g, u, d = (sd[p + f"mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        out[p + "mlp.experts.gate_up_proj"] = torch.cat([g, u], 0).unsqueeze(0).repeat(n_experts, 1, 1)
        out[p + "mlp.experts.down_proj"] = d.unsqueeze(0).repeat(n_experts, 1, 1)
        if gate == "random":
            router = 0.02 * torch.randn(n_experts, c.hidden_size, generator=gen)
        elif gate == "hidden":
            router = hidden[i] / hidden[i].norm(dim=-1, keepdim=True)
        else:
            router = torch.zeros(n_experts, c.hidden_size)
        out[p + "mlp.gate.weight"] = router
    return from_state(cfg, out)


def _zero_sum_noise(shape, s: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Noise over the last dimension's s input copies that sums to zero across them: (out, s * in)."""
    out, in_s = shape
    eta = torch.randn(out, s, in_s // s, generator=gen)
    return (scale * (eta - eta.mean(1, keepdim=True))).reshape(out, in_s)


def _grow(w: torch.Tensor, s: int, out_order: torch.Tensor | None, in_order: torch.Tensor | None, noise: float,
          gen: torch.Generator, widen_out: bool = True) -> torch.Tensor:
    """W.repeat(s, s) / s (input copies tiled), cancelling noise, then rows / columns reordered."""
    x = w.repeat(s if widen_out else 1, s) / s
    if noise:
        x = x + _zero_sum_noise(x.shape, s, noise * x.pow(2).mean().sqrt().item(), gen)
    if out_order is not None:
        x = x[out_order]
    return x[:, in_order] if in_order is not None else x


def _head_order(n_heads: int, hd: int, s: int, layout: str) -> torch.Tensor:
    """Row order of a widened q/k/v: "tiled" keeps head j + H*c (Apple's clone_matrix), "interleaved" puts the
    copies of head j side by side (head s*j + c), rows inside a head untouched (RoPE pairs stay)."""
    rows = torch.arange(s * n_heads * hd).view(s, n_heads, hd)
    return (rows if layout == "tiled" else rows.transpose(0, 1)).flatten()


def hyperclone(small, s: int = 2, noise: float = 0.3, heads: str = "tiled", residual: str = "tiled", seed: int = 0):
    """HyperCloning width growth of a Llama: hidden vectors tiled (or interleaved), heads x s with head_dim kept."""
    c, sd = small.config, small.state_dict()
    cfg = copy.deepcopy(c)
    cfg.hidden_size, cfg.intermediate_size = c.hidden_size * s, c.intermediate_size * s
    cfg.num_attention_heads, cfg.num_key_value_heads = c.num_attention_heads * s, c.num_key_value_heads * s
    cfg.tie_word_embeddings = False
    D, hd, gen = c.hidden_size, c.head_dim, torch.Generator().manual_seed(seed)
    res = torch.arange(s * D) if residual == "tiled" else torch.arange(s * D).view(s, D).t().flatten()
    q_rows = _head_order(c.num_attention_heads, hd, s, heads)
    kv_rows = _head_order(c.num_key_value_heads, hd, s, heads)
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"].repeat(1, s)[:, res],
           "model.norm.weight": sd["model.norm.weight"].repeat(s)[res],
           "lm_head.weight": _grow(sd["lm_head.weight"], s, None, res, 0.0, gen, widen_out=False)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[p + n + ".weight"] = sd[p + n + ".weight"].repeat(s)[res]
        for n, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            out[p + f"self_attn.{n}.weight"] = _grow(sd[p + f"self_attn.{n}.weight"], s, rows, res, noise, gen)
        o = sd[p + "self_attn.o_proj.weight"]  # [D, H*hd]: its input copies are the head copies
        o_big = o.repeat(s, s) / s + (_zero_sum_noise((s * D, s * o.shape[1]), s, noise * (o.pow(2).mean().sqrt().item() / s), gen)
                                     if noise else 0)
        out[p + "self_attn.o_proj.weight"] = o_big[res][:, q_rows]
        for n in ("gate_proj", "up_proj"):
            out[p + f"mlp.{n}.weight"] = _grow(sd[p + f"mlp.{n}.weight"], s, None, res, noise, gen)
        out[p + "mlp.down_proj.weight"] = _grow(sd[p + "mlp.down_proj.weight"], s, res, None, noise, gen)
    return from_state(cfg, out)

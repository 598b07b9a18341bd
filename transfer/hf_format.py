"""Hugging Face `transformers` interop for the Llama, Mistral, Qwen2, Qwen3 families and their MoE forms (Mixtral,
Qwen2-MoE, Qwen3-MoE): each reads into the project's one model and writes back exactly.

    hf = to_hf(model)                      # an in-memory transformers model with the same function
    export_hf(model, "out/", tokenizer)    # save_pretrained: config.json, safetensors, tokenizer
    model = from_hf("out/")                # back into the project's model, exactly
    hf_family("out/")                      # its model_type: llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe

A directory is read as data: config.json (trust_remote_code is never passed), then the weights' own files,
safetensors or a pickle-format .bin scanned and loaded weights-only (common/safe_load.py), never through code
the checkpoint names.

The layouts already agree (rotate-half RoPE, [out, in] weights, RMSNorm with eps inside the root, softmax -> top-k
-> renormalise routing), so conversion renames tensors; experts are packed per transformers version (v5 in memory:
experts.gate_up_proj [E, 2F, D]; on disk and in v4: one tensor per expert). Which family a model is written as:
the one named, else the one its features need (q/k norms: qwen3; q/k/v biases: qwen2; a sliding window: mistral;
else llama), and its MoE form when it has experts (MOE_FAMILY says which and why).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from common.files import SAFETENSORS_PER_TENSOR, guarded_write, unique_tensors
from common.safe_load import UnsafeFile, load_weights, refuse_code
from config import LLAMA3_ROPE_KEYS, ModelConfig
from models import build_model


class UnsupportedModel(ValueError):
    """A transformers model this project cannot represent exactly."""


# Each dense family's MoE form. Llama has none: Mixtral is Llama's blocks with experts (its sliding window unset).
# Qwen2-MoE adds a shared expert gated by a sigmoid, which the project's MoE does not have: it is written with
# shared_expert_intermediate_size=0 (its output is exactly zero, and it gets no gradient, so it stays zero) and its
# gate zero; a Qwen2-MoE whose shared expert is not zero is refused. norm_topk_prob=True makes Qwen's routing the
# project's (softmax -> top-k -> renormalise); every layer is sparse (decoder_sparse_step=1, no mlp_only_layers).
MOE_FAMILY = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe",
              "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}
DENSE_FAMILY = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3",
                "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
FAMILIES = tuple(MOE_FAMILY)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
FAMILY_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
                "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}
_QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def target_family(cfg: ModelConfig, family: str | None = None) -> str:
    """The model_type a model of `cfg` is written as: `family`'s dense or MoE form as cfg needs, or (None) the
    family its features need; UnsupportedModel when that family cannot hold one of cfg's features."""
    if family is not None and family not in MOE_FAMILY:
        raise UnsupportedModel(f"family {family!r} is not one this project writes ({', '.join(FAMILIES)})")
    if family is None:
        family = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
    family = MOE_FAMILY[family] if cfg.is_moe else DENSE_FAMILY[family]
    base = DENSE_FAMILY[family]
    problems = []
    if cfg.qk_norm != (base == "qwen3"):
        problems.append("q/k norms (qk_norm), which only qwen3 has" if cfg.qk_norm else "no q/k norms, which qwen3 has")
    if cfg.qkv_bias != (base == "qwen2"):
        problems.append("q/k/v biases, which only qwen2 has" if cfg.qkv_bias else "no q/k/v biases, which qwen2 has")
    if cfg.sliding_window is not None and base not in ("mistral",):
        problems.append(f"a sliding window ({cfg.sliding_window}), which {family} is not written with here")
    if problems:
        raise UnsupportedModel(f"cannot write this model as {family}: it has " + "; ".join(problems))
    return family


SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_config(cfg: ModelConfig, eos_token_id: int | None = None, family: str | None = None, *,
              special_tokens: dict | None = None):
    """The transformers config of `family` (target_family says which) with every field that differs from the
    family's defaults written explicitly; bos, eos and pad are eos_token_id unless `special_tokens` (a source
    config's bos_token_id / eos_token_id / pad_token_id) names them."""
    from transformers import AutoConfig

    family = target_family(cfg, family)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
                  bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    unknown = sorted(set(special_tokens or {}) - set(SPECIAL_TOKEN_FIELDS))
    if unknown:
        raise ValueError(f"special_tokens names {unknown}; only {', '.join(SPECIAL_TOKEN_FIELDS)}")
    common.update(special_tokens or {})
    if cfg.rope_scaling is not None:  # the 4.x keyword; transformers 5 folds it and rope_theta into rope_parameters
        common["rope_scaling"] = dict(cfg.rope_scaling)
    if family in ("llama", "qwen3", "qwen3_moe"):
        common.update(attention_bias=False)
    if family == "llama":
        common.update(mlp_bias=False)
    if family in ("mistral", "mixtral"):
        common.update(sliding_window=cfg.sliding_window)
    if family in _QWEN:
        common.update(use_sliding_window=False, max_window_layers=cfg.n_layers)
    if family == "mixtral":
        common.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, output_router_logits=False)
    if family in ("qwen2_moe", "qwen3_moe"):
        common.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.hidden_dim,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False)
    if family == "qwen2_moe":
        common.update(shared_expert_intermediate_size=0, qkv_bias=True)
    return AutoConfig.for_model(family, **common)


def _plain(t: torch.Tensor) -> tuple:
    return (lambda: t, lambda v: t.copy_(v))


def _zero_shared_expert(p: str, d: int) -> dict[str, tuple]:
    """Qwen2-MoE's shared expert, which the project's MoE lacks: written empty (intermediate size 0) with a zero gate;
    read only empty (a config with another size is refused before the weights are read; a nonzero down_proj,
    which an empty one cannot have, would be UnsupportedModel)."""
    def must_be_zero(v: torch.Tensor) -> None:
        if v.any():
            raise UnsupportedModel(f"{p}mlp.shared_expert: a Qwen2-MoE shared expert that is not zero (the project's "
                                   "MoE has none; only an all-zero shared expert is read)")
    q = p + "mlp.shared_expert."
    return {q + "gate_proj.weight": (lambda: torch.zeros(0, d), lambda v: None),
            q + "up_proj.weight": (lambda: torch.zeros(0, d), lambda v: None),
            q + "down_proj.weight": (lambda: torch.zeros(d, 0), must_be_zero),
            p + "mlp.shared_expert_gate.weight": (lambda: torch.zeros(1, d), lambda v: None)}


def _expert_entries(p: str, f: nn.Module, cfg: ModelConfig, hf_keys: set[str]) -> dict[str, tuple]:
    """One MoE layer's router and experts under whichever layout hf_keys use."""
    out, F = {}, cfg.hidden_dim
    if p + "mlp.experts.gate_up_proj" in hf_keys:  # transformers 5 in memory: packed experts, gate rows first
        out[p + "mlp.gate.weight"] = _plain(f.router.weight)
        out[p + "mlp.experts.gate_up_proj"] = (
            lambda: torch.cat([f.gate_proj, f.up_proj], dim=1),
            lambda v: (f.gate_proj.copy_(v[:, :F]), f.up_proj.copy_(v[:, F:])))
        out[p + "mlp.experts.down_proj"] = _plain(f.down_proj)
    elif p + "block_sparse_moe.gate.weight" in hf_keys:  # Mixtral on disk and in 4.x: w1 gate, w3 up, w2 down
        out[p + "block_sparse_moe.gate.weight"] = _plain(f.router.weight)
        for e in range(cfg.n_experts):
            q = p + f"block_sparse_moe.experts.{e}."
            out[q + "w1.weight"], out[q + "w3.weight"] = _plain(f.gate_proj[e]), _plain(f.up_proj[e])
            out[q + "w2.weight"] = _plain(f.down_proj[e])
    else:  # Qwen-MoE on disk and in 4.x: one MLP per expert
        out[p + "mlp.gate.weight"] = _plain(f.router.weight)
        for e in range(cfg.n_experts):
            q = p + f"mlp.experts.{e}."
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[q + f"{n}.weight"] = _plain(getattr(f, n)[e])
    return out


def _mapping(model: nn.Module, hf_keys: set[str]) -> dict[str, tuple]:
    """For each transformers key: (read, write) of the matching tensor of the project's model.

    One table serves export (read) and import (write), so the two directions cannot disagree.
    """
    cfg, out = model.config, {}
    out["model.embed_tokens.weight"] = _plain(model.embed.weight)
    out["model.norm.weight"] = _plain(model.norm.weight)
    if not cfg.tie_embeddings or "lm_head.weight" in hf_keys:
        out["lm_head.weight"] = _plain(model.lm_head.weight)
    for i, b in enumerate(model.blocks):
        p, f, a = f"model.layers.{i}.", b.ffn, b.attention
        out[p + "input_layernorm.weight"] = _plain(b.attention_norm.weight)
        out[p + "post_attention_layernorm.weight"] = _plain(b.ffn_norm.weight)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = _plain(getattr(a, n).weight)
        if cfg.qkv_bias:
            for n in ("q_proj", "k_proj", "v_proj"):
                out[p + f"self_attn.{n}.bias"] = _plain(getattr(a, n).bias)
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = _plain(a.q_norm.weight)
            out[p + "self_attn.k_norm.weight"] = _plain(a.k_norm.weight)
        if not cfg.is_moe:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{n}.weight"] = _plain(getattr(f, n).weight)
            continue
        out.update(_expert_entries(p, f, cfg, hf_keys))
        if p + "mlp.shared_expert_gate.weight" in hf_keys:
            out.update(_zero_shared_expert(p, cfg.dim))
    missing = set(out) - hf_keys
    if missing:
        raise UnsupportedModel(f"the transformers model lacks {sorted(missing)[:3]}: not the layout its config names")
    return out


def _hf_state(model: nn.Module, hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """The project's weights under the transformers model's own key names, fp32 on the CPU: views where they already
    are (load_state_dict copies them; a clone here held a third copy of a large model during export)."""
    return {k: read().detach().float().cpu() for k, (read, _) in _mapping(model, hf_keys).items()}


def to_hf(model: nn.Module, eos_token_id: int | None = None, family: str | None = None, *,
          special_tokens: dict | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model of `family` (target_family says which) computing what `model` computes (on the CPU, in
    fp32 or `dtype`: weights rounded from the fp32 ones once); special_tokens as hf_config takes them."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model.config, eos_token_id, family, special_tokens=special_tokens)
    with torch.random.fork_rng(devices=[]):
        hf = AutoModelForCausalLM.from_config(config)
    if dtype is not None:  # before the weights arrive: an fp32 copy of a large model beside the project's is the peak
        hf = hf.to(dtype)
    keys = set(hf.state_dict())
    missing, unexpected = hf.load_state_dict(_hf_state(model, keys), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:  # a silently random lm_head or expert is the trap this guards against
        raise RuntimeError(f"export left tensors unset {missing} or unused {unexpected}")
    return hf.eval()


def export_hf(model: nn.Module, out_dir: str, tokenizer=None, *, family: str | None = None,
              dtype: torch.dtype | None = None, special_tokens: dict | None = None) -> str:
    """save_pretrained the converted model (as `family`, target_family says which; in `dtype`, default fp32; its
    special token ids from `special_tokens`, else the tokenizer's eos) and the run's tokenizer into out_dir;
    loadable offline.

    Written into a temporary sibling first, then moved into place: a failed write raises WriteFailed and
    leaves no partial export (files already in out_dir that the export does not write are kept).
    """
    eos = None if tokenizer is None else tokenizer.eos_token_id
    hf = to_hf(model, eos, family, special_tokens=special_tokens, dtype=dtype)
    tmp = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp-{os.getpid()}"
    with guarded_write(out_dir, export_bytes(model, dtype)) as write:
        write.temporary(tmp)
        hf.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, out_dir)
    return out_dir


def export_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """About what export_hf writes: the weights once (as stored, or in `dtype`), the configs and a tokenizer
    (< 1 MiB)."""
    params = unique_tensors(model.parameters())
    size = lambda p: (torch.finfo(dtype).bits // 8 if dtype is not None else p.element_size())  # noqa: E731
    return sum(p.numel() * size(p) + SAFETENSORS_PER_TENSOR for p in params) + (1 << 20)


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Rename tmp to out_dir, or, where out_dir already holds files, rename each of tmp's files into it."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        os.replace(tmp, out_dir)  # also over an empty directory
        return
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def _rope(c) -> tuple[float, dict | None, list[str]]:
    """(theta, the project's rope_scaling, problems) of a transformers config: rope_parameters (5.x) or
    rope_theta + rope_scaling (4.x)."""
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
        return theta, None, [f"RoPE parameters {extra} beside the default RoPE"] if extra else []
    if kind != "llama3":
        return theta, None, [f"RoPE type {kind!r} (only default and llama3)"]
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta", *LLAMA3_ROPE_KEYS})
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or extra:
        return theta, None, [f"llama3 RoPE with {extra} (partial rotary or other keys)"]
    scaling = {"rope_type": "llama3", **{k: rope.get(k) for k in LLAMA3_ROPE_KEYS}}
    if scaling["original_max_position_embeddings"] is None:  # transformers falls back to the context length
        scaling["original_max_position_embeddings"] = c.max_position_embeddings
    return theta, scaling, []


def _moe_fields(c) -> tuple[int, int, int, list[str]]:
    """(experts, top_k, expert FFN size, problems) of an MoE family's config; (0, 2, intermediate, []) if dense."""
    if c.model_type == "mixtral":
        return c.num_local_experts, c.num_experts_per_tok, c.intermediate_size, []
    if c.model_type not in ("qwen2_moe", "qwen3_moe"):
        return 0, 2, c.intermediate_size, []
    problems = []
    if getattr(c, "shared_expert_intermediate_size", 0):
        problems.append(f"a shared expert (shared_expert_intermediate_size={c.shared_expert_intermediate_size}; the "
                        "project's MoE has none)")
    if not getattr(c, "norm_topk_prob", False):
        problems.append("norm_topk_prob=false (top-k weights not renormalised: the project routes softmax -> top-k "
                        "-> renormalise)")
    dense_layers = [i for i in range(c.num_hidden_layers) if i in (getattr(c, "mlp_only_layers", None) or [])
                    or (i + 1) % getattr(c, "decoder_sparse_step", 1)]
    if dense_layers:
        problems.append(f"dense MLP layers {dense_layers[:4]} among the MoE layers (mlp_only_layers / "
                        "decoder_sparse_step): every layer must be sparse")
    return c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, problems


def _sliding_window(c) -> tuple[int | None, list[str]]:
    """The project's sliding_window of a transformers config, or the problem: Mistral and Mixtral window every
    layer; Qwen's windows (use_sliding_window, per layer from max_window_layers) are not read."""
    if c.model_type in _QWEN:
        sliding = [t for t in (getattr(c, "layer_types", None) or []) if t == "sliding_attention"]
        if getattr(c, "use_sliding_window", False) or sliding:
            return None, [f"Qwen sliding-window attention (use_sliding_window=true, max_window_layers="
                          f"{getattr(c, 'max_window_layers', None)})"]
        return None, []
    if len(set(getattr(c, "layer_types", None) or [])) > 1:
        return None, [f"a mix of attention layer types {sorted(set(c.layer_types))}"]
    return getattr(c, "sliding_window", None) or None, []


def _supported(c) -> ModelConfig:
    """The project's ModelConfig for a transformers config, or UnsupportedModel naming what differs."""
    if c.model_type not in FAMILIES:
        raise UnsupportedModel(f"cannot represent this transformers model exactly: model_type {c.model_type!r} "
                               f"(supported: {', '.join(FAMILIES)})")
    problems = []
    if c.model_type in ("llama", "qwen3", "qwen3_moe") and getattr(c, "attention_bias", False):
        problems.append("attention biases (attention_bias=true puts one on o_proj too)")
    if getattr(c, "mlp_bias", False):
        problems.append("MLP biases (mlp_bias=true)")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"activation {c.hidden_act!r}")
    theta, scaling, rope_problems = _rope(c)
    window, window_problems = _sliding_window(c)
    n_experts, top_k, ffn_dim, moe_problems = _moe_fields(c)
    problems += rope_problems + window_problems + moe_problems
    if problems:
        raise UnsupportedModel("cannot represent this transformers model exactly: " + "; ".join(problems))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    base = DENSE_FAMILY[c.model_type]
    return ModelConfig(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                       n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
                       ffn_dim=ffn_dim, max_seq_len=c.max_position_embeddings, rope_theta=theta,
                       norm_eps=c.rms_norm_eps,
                       n_experts=n_experts, top_k=top_k, tie_embeddings=bool(c.tie_word_embeddings),
                       explicit_head_dim=None if head_dim * c.num_attention_heads == c.hidden_size else head_dim,
                       qkv_bias=base == "qwen2" and bool(getattr(c, "qkv_bias", True)), qk_norm=base == "qwen3",
                       sliding_window=window, rope_scaling=scaling)


def hf_family(path: str) -> str:
    """The model_type of a transformers directory's config.json (read as JSON), one of FAMILIES; UnsupportedModel
    naming any other, or a directory without a readable config.json."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            family = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise UnsupportedModel(f"{path}: no readable config.json ({type(e).__name__})") from None
    if family not in FAMILIES:
        raise UnsupportedModel(f"{path}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
    return family


def read_hf_config(path: str) -> ModelConfig:
    """The ModelConfig of a transformers directory, from its config.json alone (no remote code); UnsupportedModel
    if it cannot be read or represented."""
    from transformers import AutoConfig

    try:
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModel(f"{path}: config.json is not a transformers config it can read "
                               f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    return _supported(hf_cfg)


# Where save_pretrained puts the weights: one file, or shards listed in an index (weight_map: key -> file).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IGNORED_HF_KEYS = (".rotary_emb.inv_freq",)  # buffers some versions save; recomputed from the config


def weight_files(path: str) -> list[str]:
    """The files holding a transformers directory's weights, safetensors preferred; UnsupportedModel if none."""
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
        index = os.path.join(path, name + ".index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, shard) for shard in shards]
    raise UnsupportedModel(f"{path}: no weights there (model.safetensors, pytorch_model.bin or a sharded index of "
                           "either)")


def refuse_code_in_weights(path: str) -> None:
    """Before any work: the directory has weights, and none of its pickle files holds code (UnsafeFile)."""
    for file in weight_files(path):
        if not file.endswith(".safetensors"):
            refuse_code(file)


def read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers directory by its key: safetensors, or a pickle .bin scanned and loaded
    weights-only (UnsafeFile if it holds code); UnsupportedModel for a file that is not weights at all."""
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            weights.update(load_weights(file))
        except UnsafeFile:
            raise
        except Exception as e:  # a truncated or foreign file: safetensors' and zip's errors differ by version
            raise UnsupportedModel(f"{file}: not readable as weights ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return weights


def from_hf(path_or_model) -> nn.Module:
    """The project's model from a transformers directory (or loaded model), weights copied exactly. A directory is
    read as data: no transformers model class is instantiated and no code it names runs. Every tensor must find
    its place and every place its tensor, at its shape (UnsupportedModel otherwise)."""
    if isinstance(path_or_model, (str, os.PathLike)):
        where = str(path_or_model)
        cfg, hf_sd, family = read_hf_config(where), read_hf_weights(where), hf_family(where)
    else:
        where, cfg, hf_sd = "the transformers model", _supported(path_or_model.config), path_or_model.state_dict()
        family = path_or_model.config.model_type
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith(IGNORED_HF_KEYS)}
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg)
    mapping = _mapping(model, set(hf_sd))
    unused = sorted(set(hf_sd) - set(mapping))
    if unused:  # e.g. biases the config does not declare: dropping them would change the function
        raise UnsupportedModel(f"{where}: the weights hold {len(unused)} tensors a {family} "
                               f"model of its config has no place for ({', '.join(unused[:3])})")
    with torch.no_grad():
        for key, (_, write) in mapping.items():
            try:
                write(hf_sd[key].float())
            except RuntimeError as e:
                raise UnsupportedModel(f"{where}: {key} has shape {tuple(hf_sd[key].shape)}, which its config does "
                                       f"not give ({str(e).splitlines()[0][:100]})") from None
    return model

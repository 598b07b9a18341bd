"""Hugging Face `transformers` interop: a dense model is a LlamaForCausalLM, an MoE a MixtralForCausalLM.

    hf = to_hf(model)                      # an in-memory transformers model with the same function
    export_hf(model, "out/", tokenizer)    # save_pretrained: config.json, safetensors, tokenizer
    model = from_hf("out/")                # back into the project's model, exactly

A directory is read as data: config.json (trust_remote_code is never passed), then the weights' own files,
safetensors or a pickle-format .bin scanned and loaded weights-only (common/safe_load.py), never through code
the checkpoint names.

The layouts already agree (rotate-half RoPE, [out, in] weights, RMSNorm with eps inside the root, Mixtral's
softmax -> top-k -> renormalise routing), so conversion renames tensors; Mixtral's experts are packed
per transformers version (v5: experts.gate_up_proj [E, 2F, D]; v4: experts.N.w1/w2/w3).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from common.files import SAFETENSORS_PER_TENSOR, guarded_write, unique_tensors
from common.safe_load import UnsafeFile, load_weights, refuse_code
from config import ModelConfig
from models import build_model


class UnsupportedModel(ValueError):
    """A transformers model this project cannot represent exactly."""


def hf_config(cfg: ModelConfig, eos_token_id: int | None = None):
    """LlamaConfig or MixtralConfig with every field that differs from the HF default written explicitly."""
    from transformers import LlamaConfig, MixtralConfig

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
                  bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    if cfg.is_moe:
        return MixtralConfig(**common, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                             sliding_window=None, output_router_logits=False)
    return LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def _mapping(model: nn.Module, hf_keys: set[str]) -> dict[str, tuple]:
    """For each transformers key: (read, write) of the matching tensor of the project's model.

    One table serves export (read) and import (write), so the two directions cannot disagree.
    """
    def plain(t: torch.Tensor) -> tuple:
        return (lambda: t, lambda v: t.copy_(v))

    cfg, out = model.config, {}
    out["model.embed_tokens.weight"] = plain(model.embed.weight)
    out["model.norm.weight"] = plain(model.norm.weight)
    if not cfg.tie_embeddings or "lm_head.weight" in hf_keys:
        out["lm_head.weight"] = plain(model.lm_head.weight)
    for i, b in enumerate(model.blocks):
        p, f = f"model.layers.{i}.", b.ffn
        out[p + "input_layernorm.weight"] = plain(b.attention_norm.weight)
        out[p + "post_attention_layernorm.weight"] = plain(b.ffn_norm.weight)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = plain(getattr(b.attention, n).weight)
        if not cfg.is_moe:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{n}.weight"] = plain(getattr(f, n).weight)
        elif p + "mlp.experts.gate_up_proj" in hf_keys:  # transformers 5: packed experts, gate rows first
            out[p + "mlp.gate.weight"] = plain(f.router.weight)
            out[p + "mlp.experts.gate_up_proj"] = (
                lambda f=f: torch.cat([f.gate_proj, f.up_proj], dim=1),
                lambda v, f=f: (f.gate_proj.copy_(v[:, :cfg.hidden_dim]), f.up_proj.copy_(v[:, cfg.hidden_dim:])))
            out[p + "mlp.experts.down_proj"] = plain(f.down_proj)
        else:  # transformers 4: one module per expert (w1 gate, w3 up, w2 down)
            out[p + "block_sparse_moe.gate.weight"] = plain(f.router.weight)
            for e in range(cfg.n_experts):
                q = p + f"block_sparse_moe.experts.{e}."
                out[q + "w1.weight"], out[q + "w3.weight"] = plain(f.gate_proj[e]), plain(f.up_proj[e])
                out[q + "w2.weight"] = plain(f.down_proj[e])
    missing = set(out) - hf_keys
    if missing:
        raise UnsupportedModel(f"the transformers model lacks {sorted(missing)[:3]}: not a Llama/Mixtral layout")
    return out


def _hf_state(model: nn.Module, hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """The project's weights under the transformers model's own key names (fp32 CPU copies)."""
    return {k: read().detach().float().cpu().clone() for k, (read, _) in _mapping(model, hf_keys).items()}


def to_hf(model: nn.Module, eos_token_id: int | None = None) -> nn.Module:
    """A transformers LlamaForCausalLM / MixtralForCausalLM computing what `model` computes (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model.config, eos_token_id)
    with torch.random.fork_rng(devices=[]):
        hf = AutoModelForCausalLM.from_config(config)
    keys = set(hf.state_dict())
    missing, unexpected = hf.load_state_dict(_hf_state(model, keys), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:  # a silently random lm_head or expert is the trap this guards against
        raise RuntimeError(f"export left tensors unset {missing} or unused {unexpected}")
    return hf.eval()


def export_hf(model: nn.Module, out_dir: str, tokenizer=None) -> str:
    """save_pretrained the converted model (and the run's tokenizer) into out_dir; loadable offline.

    Written into a temporary sibling first, then moved into place: a failed write raises WriteFailed and
    leaves no partial export (files already in out_dir that the export does not write are kept).
    """
    eos = None if tokenizer is None else tokenizer.eos_token_id
    hf = to_hf(model, eos)
    tmp = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp-{os.getpid()}"
    with guarded_write(out_dir, export_bytes(model)) as write:
        write.temporary(tmp)
        hf.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, out_dir)
    return out_dir


def export_bytes(model: nn.Module) -> int:
    """About what export_hf writes: the weights once (as stored), the configs and a tokenizer (< 1 MiB)."""
    params = unique_tensors(model.parameters())
    return sum(p.numel() * p.element_size() + SAFETENSORS_PER_TENSOR for p in params) + (1 << 20)


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Rename tmp to out_dir, or, where out_dir already holds files, rename each of tmp's files into it."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        os.replace(tmp, out_dir)  # also over an empty directory
        return
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def _supported(c) -> ModelConfig:
    """The project's ModelConfig for a transformers config, or UnsupportedModel naming what differs."""
    problems = []
    if c.model_type not in ("llama", "mixtral"):
        problems.append(f"model_type {c.model_type!r} (only llama and mixtral)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        problems.append("attention or MLP biases")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"activation {c.hidden_act!r}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(f"head_dim {head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}")
    if c.model_type == "mixtral" and getattr(c, "sliding_window", None):
        problems.append(f"sliding-window attention ({c.sliding_window})")
    if problems:
        raise UnsupportedModel("cannot represent this transformers model exactly: " + "; ".join(problems))
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    return ModelConfig(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                       n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, ffn_dim=c.intermediate_size,
                       max_seq_len=c.max_position_embeddings, rope_theta=float(theta), norm_eps=c.rms_norm_eps,
                       n_experts=getattr(c, "num_local_experts", 0) if c.model_type == "mixtral" else 0,
                       top_k=getattr(c, "num_experts_per_tok", 2), tie_embeddings=bool(c.tie_word_embeddings))


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
        cfg, hf_sd = read_hf_config(where), read_hf_weights(where)
    else:
        where, cfg, hf_sd = "the transformers model", _supported(path_or_model.config), path_or_model.state_dict()
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith(IGNORED_HF_KEYS)}
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg)
    mapping = _mapping(model, set(hf_sd))
    unused = sorted(set(hf_sd) - set(mapping))
    if unused:  # e.g. biases the config does not declare: dropping them would change the function
        raise UnsupportedModel(f"{where}: the weights hold {len(unused)} tensors a {'Mixtral' if cfg.is_moe else 'Llama'} "
                               f"model of its config has no place for ({', '.join(unused[:3])})")
    with torch.no_grad():
        for key, (_, write) in mapping.items():
            try:
                write(hf_sd[key].float())
            except RuntimeError as e:
                raise UnsupportedModel(f"{where}: {key} has shape {tuple(hf_sd[key].shape)}, which its config does "
                                       f"not give ({str(e).splitlines()[0][:100]})") from None
    return model

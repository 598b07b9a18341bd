
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from tests.conftest import tiny_config, tokens_for


def test_forward_shapes_details_and_config(tokens):
    model = build_model(tiny_config(n_experts=4, top_k=2))
    out = model(tokens, return_details=True)
    assert model(tokens).shape == (4, 64, 300) and torch.equal(out.logits, model(tokens))
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (4, 64, 32)
    assert [r.shape for r in out.router_logits] == [(256, 4), (256, 4)]
    assert model.config.n_experts == 4 and model.blocks[0].attention.n_heads == 4


def test_causal_future_tokens_do_not_change_past_logits(tokens):
    model = build_model(tiny_config())
    changed = tokens.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % 256
    assert torch.allclose(model(tokens)[:, :40], model(changed)[:, :40], atol=1e-6)
    assert not torch.allclose(model(tokens)[:, 40:], model(changed)[:, 40:], atol=1e-3)


def test_sdpa_matches_explicit_attention_reference(tokens):
    model = build_model(tiny_config(n_kv_heads=2)).double()
    attn, x = model.blocks[0].attention, model.embed(tokens).double()
    cos, sin = model.rope_cos, model.rope_sin
    _, _, v = attn.qkv(x, cos, sin)
    ref = attn.o_proj((attn.attention_probs(x, cos, sin) @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(attn(x, cos, sin), ref, atol=1e-12)


def test_rope_is_relative_attention_scores_depend_on_offset_only():
    model = build_model(tiny_config()).double()
    cos, sin = model.rope_cos, model.rope_sin
    from models.model import apply_rope
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    def score(i, j):
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()
    # the tables are float32 (as in HF Llama): equal to their rounding, 1e-6 here; a shifted offset differs by 0.1
    assert abs(score(5, 2) - score(45, 42)) < 1e-6 and abs(score(5, 2) - score(5, 4)) > 1e-2


def test_tied_head_shares_the_embedding_and_untied_does_not():
    tied, untied = build_model(tiny_config()), build_model(tiny_config(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight


def test_sequence_longer_than_max_seq_len_is_rejected():
    with pytest.raises(ValueError, match="exceeds max_seq_len=128"):
        build_model(tiny_config())(torch.zeros(1, 129, dtype=torch.long))


def test_parameter_counts_total_and_active():
    cfg = tiny_config(n_experts=4, top_k=1)
    model = build_model(cfg)
    per_expert = 3 * cfg.dim * cfg.hidden_dim
    assert model.num_parameters() - model.num_parameters(active=True) == cfg.n_layers * 3 * per_expert


@pytest.mark.parametrize("n_experts,tie,kv", [(0, False, None), (0, True, 2), (4, False, None), (4, True, 1)])
def test_flops_per_token_equals_counted_training_flops(n_experts, tie, kv):
    """The benchmarks' FLOP count equals what torch's FlopCounterMode counts for one forward + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny_config(n_experts=n_experts, top_k=2, tie_embeddings=tie, n_kv_heads=kv, max_seq_len=32)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    # The math backend is made of counted matmuls; the fused CPU kernel is invisible to the counter.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    assert counter.get_total_flops() == model.flops_per_token(32) * x.numel()


def test_matches_hugging_face_llama_with_the_same_weights():
    """Same weights in transformers' LlamaForCausalLM give the same logits: RoPE convention, GQA, norms."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_config(n_kv_heads=2, tie_embeddings=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False))
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": b.attention_norm.weight,
               p + "post_attention_layernorm.weight": b.ffn_norm.weight}
        sd |= {p + f"self_attn.{n}.weight": getattr(b.attention, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        sd |= {p + f"mlp.{n}.weight": getattr(b.ffn, n).weight for n in ("gate_proj", "up_proj", "down_proj")}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = tokens_for(2, 128)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() < 1e-4


import pytest
import torch
import torch.nn.functional as F

from models import build_model, load_balancing_loss, model_holding, router_z_loss
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


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}
# The transformers families' features (config.py), each on, and all at once.
FEATURES = {"plain": {}, "window": dict(sliding_window=5), "qwen2": dict(qkv_bias=True),
            "qwen3": dict(qk_norm=True, explicit_head_dim=12), "llama3": dict(rope_scaling=LLAMA3),
            "all": dict(sliding_window=5, qkv_bias=True, qk_norm=True, explicit_head_dim=12, rope_scaling=LLAMA3)}


def _moved_off_init(model):
    """Biases nonzero and norms away from 1, so that a feature left out shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("features", FEATURES)
def test_sdpa_matches_explicit_attention_reference(tokens, features):
    torch.manual_seed(0)
    model = _moved_off_init(build_model(tiny_config(n_kv_heads=2, **FEATURES[features]))).double()
    attn, x = model.blocks[0].attention, model.embed(tokens).double()
    cos, sin = model.rope_cos, model.rope_sin
    _, _, v = attn.qkv(x, cos, sin)
    ref = attn.o_proj((attn.attention_probs(x, cos, sin) @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(attn(x, cos, sin), ref, atol=1e-12)


def test_sliding_window_limits_what_a_token_sees_to_itself_and_the_window_before():
    """One layer, window 4 (transformers' convention: key j visible from query i when i - 4 < j <= i)."""
    model = build_model(tiny_config(n_layers=1, sliding_window=4))
    tokens = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 300
    diff = (model(tokens) - model(changed)).abs().amax(dim=-1)[0]
    assert diff[:10].max() == 0 and diff[10:14].min() > 0 and diff[14:].max() == 0


def test_a_window_as_long_as_the_sequence_is_plain_causal_attention(tokens):
    plain, windowed = build_model(tiny_config()), build_model(tiny_config(sliding_window=64))
    windowed.load_state_dict(plain.state_dict())
    assert torch.equal(plain(tokens), windowed(tokens))  # T = 64 = window: the is_causal path


def test_llama3_rope_tables_equal_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from models.model import rope_tables

    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_theta=10000.0,
                     rope_scaling=dict(LLAMA3))
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    angles = torch.outer(torch.arange(256, dtype=torch.float32), inv_freq)
    cos, sin = rope_tables(16, 256, 10000.0, LLAMA3)
    angles = torch.cat([angles, angles], dim=-1)
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    plain, _ = rope_tables(16, 256, 10000.0)
    assert not torch.equal(cos, plain)


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


@pytest.mark.parametrize("tie,n_experts,dtype", [(True, 0, torch.float32), (False, 4, torch.bfloat16)])
def test_model_holding_takes_the_tensors_themselves(tie, n_experts, dtype, tokens):
    """model_holding adopts the state's tensors (no initialised copy first), keeps the declared tie, and computes
    what build_model + load_state_dict computes, RoPE tables in the weights' dtype included."""
    cfg = tiny_config(tie_embeddings=tie, n_experts=n_experts)
    ref = build_model(cfg).to(dtype)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    model = model_holding(cfg, state)
    for name, p in model.named_parameters():
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad and p.data_ptr() == state[name].data_ptr()
    assert (model.lm_head.weight is model.embed.weight) is tie
    assert model.rope_cos.dtype == ref.rope_cos.dtype == dtype and torch.equal(model.rope_cos, ref.rope_cos)
    assert torch.equal(model(tokens), ref(tokens))
    del state["norm.weight"]
    with pytest.raises(RuntimeError, match="norm.weight"):
        model_holding(cfg, state)


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


# ------------------------------------------------------------------------------------------ dtype flow
class _Record(__import__("torch.utils._python_dispatch", fromlist=["TorchDispatchMode"]).TorchDispatchMode):
    """Every aten op's name, input tensors' (shape, dtype) and output's, as it runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [(tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor)]
        outs = [(tuple(o.shape), o.dtype) for o in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(o, torch.Tensor)]
        self.calls.append((str(func), ins, outs))
        return out


@pytest.mark.parametrize("n_experts", [0, 4])
def test_under_bf16_autocast_each_norm_casts_once_and_attention_runs_in_bf16(n_experts, tokens):
    """One block, fp32 weights and residual, bf16 autocast: the normalised input is cast to bf16 once per norm
    (not once by each projection reading it), RoPE runs in bf16 (no fp32 tensor of q's shape), and SDPA is
    handed q, k, v of one dtype."""
    model = build_model(tiny_config(n_experts=n_experts))
    block, x = model.blocks[0], model.embed(tokens)  # (B, T, D) fp32
    B, T, D = x.shape
    cos, sin = model.rope_cos[:T].to(torch.bfloat16), model.rope_sin[:T].to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Record() as rec:
        block(x, cos, sin)
    flat = (B * T, D)
    activation_casts = [c for c in rec.calls if c[0].startswith("aten._to_copy") and c[1][0][0] in ((B, T, D), flat)
                        and c[1][0][1] == torch.float32 and c[2][0][1] == torch.bfloat16]
    assert len(activation_casts) == 2, activation_casts  # attention_norm's and ffn_norm's outputs
    q_shape = (B, block.attention.n_heads, T, block.attention.head_dim)
    assert not [c for c in rec.calls if any(o == (q_shape, torch.float32) for o in c[2])]
    [sdpa] = [c for c in rec.calls if "scaled_dot_product" in c[0]]
    assert {dtype for _, dtype in sdpa[1][:3]} == {torch.bfloat16}


def test_float64_forward_has_no_casts_and_autocast_leaves_it_alone(tokens):
    """The checks' float64 copies: no op changes dtype, with or without an enclosing autocast."""
    model = build_model(tiny_config(n_experts=4)).double()
    plain = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Record() as rec:
        under = model(tokens)
    assert torch.equal(plain, under) and under.dtype == torch.float64
    assert not [c for c in rec.calls if any(d in (torch.bfloat16, torch.float32) for _, d in c[2])
                and c[1] and all(d == torch.float64 for _, d in c[1])]


# ------------------------------------------------------------------------------------------ one graph
def _bf16_training_forward(model):
    """The loop's training forward: details (router logits) included, grad on, bf16 autocast, fp32 loss."""
    def fwd(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, return_details=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        for logits in out.router_logits:
            loss = loss + 0.01 * load_balancing_loss(logits, 2) + 1e-3 * router_z_loss(logits)
        return loss
    return fwd


def _compile_model(n_experts: int, checkpointing: bool, **features):
    torch.manual_seed(0)
    model = build_model(tiny_config(n_experts=n_experts, top_k=2, **features)).train()
    model.activation_checkpointing = checkpointing
    return model


@pytest.mark.parametrize("n_experts", [0, 4])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_training_forward_has_no_graph_breaks(n_experts, checkpointing, tokens):
    """torch._dynamo.explain over the training forward and its objective (balance and z losses included)."""
    model = _compile_model(n_experts, checkpointing)
    explained = torch._dynamo.explain(_bf16_training_forward(model))(tokens[:, :-1], tokens[:, 1:])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("n_experts", [0, 4])
def test_the_families_features_add_no_graph_break(n_experts, tokens):
    """Sliding window shorter than the sequence (the explicit mask), q/k/v biases, q/k norms, explicit head_dim and
    llama3 RoPE together: still one graph."""
    model = _compile_model(n_experts, False, **FEATURES["all"])
    explained = torch._dynamo.explain(_bf16_training_forward(model))(tokens[:, :-1], tokens[:, 1:])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("n_experts", [0, 4])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fullgraph_compiled_bf16_step_equals_eager(n_experts, checkpointing, tokens, single_thread):
    """torch.compile(fullgraph=True) (Inductor) of the training forward + backward: loss and every gradient equal
    eager's within bf16 tolerance (Inductor fuses and reorders bf16 arithmetic; 2^-8 relative per rounding)."""
    x, y = tokens[:2, :-1], tokens[:2, 1:]
    eager, compiled = _compile_model(n_experts, checkpointing), _compile_model(n_experts, checkpointing)
    losses = []
    for model, fn in ((eager, _bf16_training_forward(eager)),
                      (compiled, torch.compile(_bf16_training_forward(compiled), fullgraph=True))):
        loss = fn(x, y)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=0, atol=5e-2 * max(p.grad.abs().max().item(), 1e-6)), name
    torch._dynamo.reset()

"""Every transformers family the project reads, exactly: Llama (MHA and GQA, tied or not, default and llama3 RoPE),
Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k norms, explicit head_dim), Mixtral, Qwen3-MoE and
Qwen2-MoE (zero shared expert). Each is built from its transformers config with its weights moved off init
(biases nonzero, norms away from 1), then read, compared with transformers, written back, grown and compared in
float64; each growth rule's wrong variant is shown to be visible to the comparison."""
from __future__ import annotations

import copy

import pytest
import torch

from models.model import rope_tables
from transfer.hf_format import (ARCHITECTURES, UnsupportedModel, export_hf, from_hf, hf_family, read_hf_config,
                                target_family, to_hf)
from transfer.simple_growth import dense_to_moe, scale_bilaterally

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
# original 128, head_dim 8, theta 1e4: wavelengths 6.3 (kept), 63 (interpolated), 628 and 6283 (slowed by factor)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True)
# name: (model_type, config fields beyond TINY)
CASES = {
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_gqa_llama3": ("llama", dict(rope_scaling=LLAMA3, rope_theta=10000.0)),
    "mistral_window": ("mistral", dict(sliding_window=5)),
    "qwen2": ("qwen2", dict()),
    "qwen3": ("qwen3", dict(head_dim=12)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=12, **MOE)),
    "qwen2_moe": ("qwen2_moe", dict(shared_expert_intermediate_size=0, **MOE)),
}
DENSE = [n for n, (t, _) in CASES.items() if t in ("llama", "mistral", "qwen2", "qwen3")]
SEQ = 20  # longer than the sliding windows (5, 6): the window must cut


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf_model(name: str, seed: int = 0):
    """A transformers model of CASES[name], every weight moved off its init, seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = CASES[name]
    config = AutoConfig.for_model(model_type, **copy.deepcopy(TINY | extra))  # transformers edits rope dicts
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                norm = n.endswith("norm.weight")
                p.copy_(1 + 0.2 * torch.randn_like(p) if norm else p + 0.05 * torch.randn_like(p))
    return model.eval()


def batch(seed: int = 0, n: int = 2, T: int = SEQ) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n, T), generator=torch.Generator().manual_seed(seed))


def rel_diff(ref: torch.Tensor, other: torch.Tensor) -> float:
    """max |ref - other| / RMS(ref)."""
    ref, other = ref.double(), other.double()
    return ((ref - other).abs().max() / ref.pow(2).mean().sqrt()).item()


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


def ours_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("name", CASES)
def test_from_hf_computes_the_transformers_logits(name):
    hf = hf_model(name)
    ours = from_hf(hf)
    tokens = batch()
    assert rel_diff(hf_logits(hf, tokens), ours_logits(ours, tokens)) <= 1e-5


def test_each_feature_is_read_into_the_config():
    cfgs = {name: from_hf(hf_model(name)).config for name in CASES}
    assert cfgs["llama_mha_tied"].tie_embeddings and cfgs["llama_mha_tied"].kv_heads == 4
    assert cfgs["llama_gqa_llama3"].rope_scaling == LLAMA3 and cfgs["llama_gqa_llama3"].kv_heads == 2
    assert cfgs["mistral_window"].sliding_window == 5 and cfgs["mixtral"].sliding_window == 6
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].qk_norm and cfgs["qwen2_moe"].qkv_bias
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 12 and cfgs["qwen3"].explicit_head_dim == 12
    assert cfgs["qwen3_moe"].n_experts == 4 and cfgs["qwen3_moe"].hidden_dim == 24


@pytest.mark.parametrize("name", CASES)
def test_export_loads_in_transformers_as_its_family_and_reads_back_exactly(tmp_path, name):
    from transformers import AutoModelForCausalLM

    hf = hf_model(name)
    ours = from_hf(hf)
    export_hf(ours, str(tmp_path), family=hf.config.model_type)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(loaded).__name__ == ARCHITECTURES[hf.config.model_type] == type(hf).__name__
    tokens = batch(1)
    assert rel_diff(hf_logits(hf, tokens), hf_logits(loaded, tokens)) <= 1e-5
    assert hf_family(str(tmp_path)) == hf.config.model_type
    back = from_hf(str(tmp_path))
    assert back.config == ours.config
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name, family", [("llama_mha_tied", "llama"), ("mistral_window", "mistral"),
                                          ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("mixtral", "mixtral")])
def test_without_a_family_the_features_pick_it(name, family):
    assert target_family(from_hf(hf_model(name)).config) == family


def test_a_family_that_cannot_hold_a_feature_is_refused():
    qwen3 = from_hf(hf_model("qwen3")).config
    with pytest.raises(UnsupportedModel, match="cannot write this model as llama: it has q/k norms"):
        target_family(qwen3, "llama")
    with pytest.raises(UnsupportedModel, match="a sliding window"):
        target_family(from_hf(hf_model("mistral_window")).config, "qwen2")
    with pytest.raises(UnsupportedModel, match="family 'gpt2'"):
        target_family(qwen3, "gpt2")


def test_export_in_bfloat16_writes_bfloat16_safetensors(tmp_path):
    from safetensors import safe_open

    export_hf(from_hf(hf_model("qwen2")), str(tmp_path), dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


@pytest.mark.parametrize("name", CASES)
def test_load_back_in_the_stored_dtype_gives_the_fp32_models_logits(tmp_path, name):
    """grow_hf's load-back keeps a bf16 checkpoint in bf16 and runs each decoder layer in fp32 while it runs:
    the logits of the same checkpoint loaded whole in fp32, for every family's transformers class."""
    from transformers import AutoModelForCausalLM

    from training.hf_growth import load_logits

    hf_model(name).to(torch.bfloat16).save_pretrained(str(tmp_path))
    tokens = batch()
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(tokens).logits
    got = load_logits(str(tmp_path), tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype="auto")
    assert next(loaded.model.layers.parameters()).dtype == torch.bfloat16  # "auto" reads the stored dtype


# ------------------------------------------------------------------------------------------------------- growth
def grown_models(name: str):
    """(source, each growth of it) in float64: dense families upcycle (4 experts, top 2) then widen x2 and add 2
    layers; MoE families widen x2 and add 2 layers."""
    src = from_hf(hf_model(name)).double()
    if src.config.is_moe:
        return src, {"grown": scale_bilaterally(src, 2, 2, noise_std=0.3, seed=1)}
    moe = dense_to_moe(src, 4, 2, seed=1)
    return src, {"upcycled": moe, "grown": scale_bilaterally(moe, 2, 2, noise_std=0.3, seed=1),
                 "widened": scale_bilaterally(src, 2, 0, noise_std=0.3, seed=1),
                 "deepened": scale_bilaterally(src, 1, 2, seed=1)}


@pytest.mark.parametrize("name", CASES)
def test_growth_of_every_family_is_exact_in_float64(name):
    src, grown = grown_models(name)
    tokens = batch(2)
    ref = ours_logits(src, tokens)
    for what, model in grown.items():
        assert rel_diff(ref, ours_logits(model, tokens)) <= 1e-10, what
        c, s = model.config, src.config
        assert (c.head_dim, c.qkv_bias, c.qk_norm, c.sliding_window, c.rope_scaling) == (
            s.head_dim, s.qkv_bias, s.qk_norm, s.sliding_window, s.rope_scaling), what


@pytest.mark.parametrize("name", CASES)
def test_grown_model_exports_as_the_family_moe_form_and_matches_the_source(name):
    hf = hf_model(name)
    _, grown = grown_models(name)
    out = to_hf(grown["grown"].float(), family=hf.config.model_type)
    expected = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
    assert out.config.model_type == expected.get(hf.config.model_type, hf.config.model_type)
    assert out.config.num_hidden_layers == 4 and out.config.hidden_size == 64
    tokens = batch(3)
    assert rel_diff(hf_logits(hf, tokens), hf_logits(out, tokens)) <= 1e-4


def _divide_biases(model, s):
    for b in model.blocks:
        for n in ("q_proj", "k_proj", "v_proj"):
            getattr(b.attention, n).bias.div_(s)


def _reset_qk_norms(model, s):
    for b in model.blocks:
        b.attention.q_norm.weight.fill_(1.0)
        b.attention.k_norm.weight.fill_(1.0)


def _drop_window(model, s):
    for b in model.blocks:
        b.attention.sliding_window = None


def _unscaled_rope(model, s):
    c = model.config
    cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta)
    model.rope_cos.copy_(cos), model.rope_sin.copy_(sin)


@pytest.mark.parametrize("name, wrong_rule", [
    ("qwen2", _divide_biases),            # a bias divided by s like a fan-in weight
    ("qwen3", _reset_qk_norms),           # q/k norms re-initialised instead of kept
    ("mistral_window", _drop_window),     # the sliding window not carried over
    ("mixtral", _drop_window),
    ("llama_gqa_llama3", _unscaled_rope),  # llama3 RoPE scaling not carried over
])
def test_each_growth_rule_done_wrong_is_visible(name, wrong_rule):
    src, grown = grown_models(name)
    model = grown["grown"]
    tokens = batch(4, T=SEQ if name != "llama_gqa_llama3" else 200)  # low frequencies show over long spans
    with torch.no_grad():
        wrong_rule(model, 2)
    assert rel_diff(ours_logits(src, tokens), ours_logits(model, tokens)) > 1e-4


def test_q_norm_tiled_like_a_residual_norm_cannot_even_load(monkeypatch):
    import transfer.simple_growth as growth

    monkeypatch.setattr(growth, "HEAD_DIM_NORMS", ())  # q/k norms fall through to the RMSNorm rule: tiled
    src = from_hf(hf_model("qwen3")).double()
    with pytest.raises(RuntimeError, match="q_norm"):
        scale_bilaterally(src, 2, 0)


def test_inserted_block_of_a_biased_family_is_an_identity():
    src, grown = grown_models("qwen2")
    deep = grown["deepened"]
    inserted = [b for b in deep.blocks if not b.attention.o_proj.weight.any()]
    assert len(inserted) == 2 and all(b.attention.q_proj.bias.any() for b in inserted)  # biases kept, inert


# ------------------------------------------------------------------------------------------------- refusals
def _save(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def test_gpt2_is_refused_naming_its_model_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96, n_positions=64))
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2'"):
        from_hf(gpt2)
    path = _save(gpt2, tmp_path)
    for read in (hf_family, read_hf_config, from_hf):
        with pytest.raises(UnsupportedModel, match="model_type 'gpt2'") as e:
            read(path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("model_type, extra, text", [
    ("llama", dict(attention_bias=True), "attention biases"),
    ("llama", dict(mlp_bias=True), "MLP biases"),
    ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "RoPE type 'yarn'"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "Qwen sliding-window"),
    ("qwen3", dict(attention_bias=True), "attention biases"),
    ("qwen3_moe", dict(MOE, norm_topk_prob=False), "norm_topk_prob=false"),
    ("qwen3_moe", dict(MOE, mlp_only_layers=[0]), "dense MLP layers [0]"),
    ("qwen3_moe", dict(MOE, decoder_sparse_step=2), "dense MLP layers [0]"),
    ("qwen2_moe", dict(MOE, shared_expert_intermediate_size=16), "a shared expert (shared_expert_intermediate_size=16"),
])
def test_features_it_cannot_represent_are_refused_by_name(model_type, extra, text):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(TINY | extra)))
    with pytest.raises(UnsupportedModel, match=text.replace("[", r"\[").replace("(", r"\(")) as e:
        from_hf(hf)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------- the checks
def check_tokens() -> torch.Tensor:
    return batch(5, n=4, T=64)  # longer than the windows; the RoPE check wants 16 or more


@pytest.mark.parametrize("name", CASES)
def test_the_checks_pass_correct_growths_of_every_family(name):
    from transfer.checks import detailed_growth_check, upcycling_check

    src, tokens = from_hf(hf_model(name)), check_tokens()
    moe = src
    if not src.config.is_moe:
        moe = dense_to_moe(src, 4, 2, seed=1, calibration_tokens=tokens)
        assert upcycling_check(src, moe, tokens, verbose=False).passed
    grown = scale_bilaterally(moe, 2, 2, noise_std=0.3, seed=1, calibration_tokens=tokens)
    report = detailed_growth_check(moe, grown, tokens, verbose=False)
    assert report.passed, report.summary()


@pytest.mark.parametrize("name, wrong_rule", [("qwen2", _divide_biases), ("qwen3", _reset_qk_norms),
                                              ("mistral_window", _drop_window), ("llama_gqa_llama3", _unscaled_rope)])
def test_the_checks_fail_each_growth_rule_done_wrong(name, wrong_rule):
    from transfer.checks import detailed_growth_check

    src = from_hf(hf_model(name))
    grown = scale_bilaterally(src, 2, 2, noise_std=0.3, seed=1)
    with torch.no_grad():
        wrong_rule(grown, 2)
    report = detailed_growth_check(src, grown, check_tokens(), verbose=False)
    assert not report.passed and not report.results["functional"].passed


@pytest.mark.parametrize("name", ["qwen3", "mistral_window"])
def test_verify_growth_judges_and_names_a_family_pair_written_by_transformers(tmp_path, capsys, name):
    import verify_growth

    hf = hf_model(name)
    small = str(tmp_path / "small")
    hf.save_pretrained(small, safe_serialization=True)
    src = from_hf(small)
    grown = scale_bilaterally(dense_to_moe(src, 4, 2, seed=1), 2, 2, seed=1)
    export_hf(grown, str(tmp_path / "big"), family=hf_family(small))
    capsys.readouterr()
    code = verify_growth.main([small, str(tmp_path / "big")])
    out = capsys.readouterr().out
    names = {"qwen3": ("Qwen3", "Qwen3-MoE"), "mistral_window": ("Mistral", "Mixtral")}[name]
    assert code == 0, out
    assert f"transformers {names[0]} directory" in out and f"transformers {names[1]} directory" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3", "mistral_window"])
def test_init_from_hf_trains_a_family_and_export_hf_writes_its_moe_form(tmp_path, name, capsys):
    """The pipeline from a Qwen3 (q/k norms, head_dim 12) or a Mistral (window 5, shorter than the micro preset's
    64-token sequences): all checks pass, and export_hf.py writes the family's MoE form, which transformers runs."""
    import export_hf as export_cli
    import train_tinystories
    from transformers import AutoConfig, AutoModelForCausalLM

    from data import generate_stories, train_tokenizer
    from training.run_state.checkpoint import find_checkpoint

    tokenizer = train_tokenizer(generate_stories(300), 300)
    model_type, extra = CASES[name]
    fields = copy.deepcopy(TINY | extra) | dict(vocab_size=len(tokenizer), max_position_embeddings=64)
    src = tmp_path / "src"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields)).save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    run = tmp_path / "run"
    assert train_tinystories.main(["--preset", "micro", "--out-dir", str(run), "--init-from-hf", str(src),
                                   "--dense_steps=3", "--moe_steps=3", "--grown_steps=3", "--eval_interval=3",
                                   "--checkpoint_interval=3"]) == 0
    assert "2 transitions verified. ✓ ALL CHECKS PASSED" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert export_cli.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    expected = {"qwen3": "Qwen3MoeForCausalLM", "mistral_window": "MixtralForCausalLM"}[name]
    assert expected in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ours = find_checkpoint(str(run))[0].load_model().eval()
    tokens = batch(6, T=64) % len(tokenizer)
    assert type(hf).__name__ == expected and rel_diff(ours_logits(ours, tokens), hf_logits(hf, tokens)) <= 1e-5


def test_special_token_ids_of_the_source_are_written_when_given(tmp_path):
    src = hf_model("llama_gqa_llama3")
    ids = dict(bos_token_id=1, eos_token_id=[2, 3], pad_token_id=None)
    export_hf(from_hf(src), str(tmp_path), family="llama", special_tokens=ids)
    import json

    written = json.load(open(tmp_path / "config.json"))
    assert (written["bos_token_id"], written["eos_token_id"], written.get("pad_token_id")) == (1, [2, 3], None)
    with pytest.raises(ValueError, match="special_tokens names"):
        to_hf(from_hf(src), special_tokens={"unk_token_id": 0})

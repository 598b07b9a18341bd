"""Every phase's model exports to transformers (Llama / Mixtral), computes the same logits and greedy
tokens there, and imports back exactly."""
import os
from dataclasses import replace

import pytest
import torch

import export_hf
from data import generate_stories, train_tokenizer
from models import build_model, generate
from tests.conftest import tiny_config, tokens_for
from tests.helpers import ROOT, trained_like_moe
from transfer import scale_bilaterally
from transfer.hf_format import UnsupportedModel, export_hf as export, from_hf, to_hf


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(generate_stories(300), 300)


def phase_models():
    torch.manual_seed(0)
    dense = build_model(tiny_config(n_kv_heads=2, rope_theta=5000.0, norm_eps=1e-5))
    moe = trained_like_moe(dense)
    return {"dense": dense, "moe": moe, "grown": scale_bilaterally(moe, 2, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["dense", "moe", "grown"])
def test_exported_model_matches_logits_and_greedy_tokens_and_round_trips(tmp_path, tokenizer, phase):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = phase_models()[phase]
    export(model, str(tmp_path), tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if phase == "dense" else "MixtralForCausalLM")
    assert AutoTokenizer.from_pretrained(str(tmp_path)).encode("Once upon a time") == tokenizer.encode("Once upon a time")
    tokens = tokens_for(2, model.config.max_seq_len)  # full context length
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
    prompt = tokens[:1, :12]
    ours = generate(model, prompt, 40, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert torch.equal(ours, theirs)
    back = from_hf(str(tmp_path))
    resolved = lambda c: replace(c, ffn_dim=c.hidden_dim, n_kv_heads=c.kv_heads)  # noqa: E731
    assert resolved(back.config) == resolved(model.config)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_config_fields_that_differ_from_hf_defaults_are_written(tmp_path):
    model = phase_models()["grown"]
    export(model, str(tmp_path))
    import json

    cfg = json.load(open(tmp_path / "config.json"))
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    assert theta == 5000.0 and cfg["rms_norm_eps"] == 1e-5 and cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] == 4 and cfg["num_experts_per_tok"] == 2 and cfg["num_local_experts"] == 4
    assert cfg["max_position_embeddings"] == 128 and cfg["head_dim"] == 8


def test_the_comparison_can_fail_a_wrong_expert_layout_is_visible():
    model = phase_models()["moe"]
    hf = to_hf(model)
    tokens = tokens_for(2, 64)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "gate_up_proj" in name or name.endswith("w1.weight"):
                p.copy_(p.flip(-2))  # rows in the wrong order: gate and up mixed
        assert (hf(tokens).logits - model(tokens)).abs().max().item() > 1e-3


def test_tied_model_exports_tied_and_keeps_its_embedding(tmp_path):
    torch.manual_seed(1)
    model = build_model(tiny_config())
    export(model, str(tmp_path))
    back = from_hf(str(tmp_path))
    assert back.config.tie_embeddings and back.lm_head.weight is back.embed.weight
    assert torch.equal(back.embed.weight, model.embed.weight)


def test_unrepresentable_models_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    for extra, text in [(dict(attention_bias=True), "biases"),
                        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE type 'linear'"),
                        (dict(hidden_act="gelu"), "activation")]:
        with pytest.raises(UnsupportedModel, match=text):
            from_hf(LlamaForCausalLM(LlamaConfig(**base, **extra)))


def test_export_leaves_the_model_untouched():
    model = phase_models()["grown"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_hf(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_export_cli_from_a_run_directory(tmp_path, capsys):
    import train_tinystories

    run = tmp_path / "run"
    assert train_tinystories.main(["--preset", "micro", "--out-dir", str(run), "--dense_steps=5", "--moe_steps=5",
                                   "--grown_steps=5", "--eval_interval=5", "--checkpoint_interval=5"]) == 0
    out = tmp_path / "hf"
    assert export_hf.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    assert "MixtralForCausalLM" in capsys.readouterr().out
    assert os.path.exists(out / "config.json") and os.path.exists(out / "tokenizer.json")
    assert export_hf.main(["--checkpoint", str(run), "--out", str(out)]) == 2  # never overwrites
    assert export_hf.main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_init_from_hf_starts_phase_1_from_a_llama_checkpoint(tmp_path, tokenizer, capsys):
    """A small Llama saved by transformers (with its tokenizer) is upcycled and grown by the pipeline."""
    import train_tinystories
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, rope_theta=5000.0, tie_word_embeddings=False))
    src = tmp_path / "llama"
    llama.save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    run = tmp_path / "run"
    args = ["--preset", "micro", "--out-dir", str(run), "--init-from-hf", str(src), "--dense_steps=3",
            "--moe_steps=3", "--grown_steps=3", "--eval_interval=3", "--checkpoint_interval=3", "--dense_lr=1e-9"]
    assert train_tinystories.main(args) == 0
    assert "✓ ALL CHECKS PASSED" in capsys.readouterr().out
    from training.run_state.checkpoint import read_checkpoint

    dense = read_checkpoint(str(run / "checkpoints" / "dense-000003")).load_model()  # barely moved (lr 1e-9)
    assert torch.allclose(dense.embed.weight, llama.model.embed_tokens.weight, atol=1e-6)
    assert torch.allclose(dense.blocks[1].attention.k_proj.weight, llama.model.layers[1].self_attn.k_proj.weight, atol=1e-6)
    import json

    settings = json.load(open(run / "settings.json"))["model"]
    assert (settings["dim"], settings["n_kv_heads"], settings["rope_theta"], settings["vocab_size"]) == (64, 2, 5000.0, 300)
    bad = tmp_path / "bad"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, attention_bias=True)).save_pretrained(str(bad))
    tokenizer.save_pretrained(str(bad))
    assert train_tinystories.main(["--preset", "micro", "--out-dir", str(tmp_path / "r2"), "--init-from-hf", str(bad)]) == 2
    assert "biases" in capsys.readouterr().err
    assert train_tinystories.main(["--preset", "micro", "--out-dir", str(tmp_path / "r3"), "--init-from-hf", str(src),
                                   "--dim=32"]) == 2


@pytest.mark.slow
def test_init_from_hf_refuses_a_tokenizer_larger_than_the_embedding_before_any_work(tmp_path, tokenizer):
    """A Llama of 128 embedding rows beside a 300-token tokenizer: one line naming both sizes, exit 2, nothing
    written (it used to end in IndexError inside the embedding, after tokenizing the data)."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    src = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=64)).save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    run = tmp_path / "run"
    root = ROOT
    done = subprocess.run([sys.executable, "train_tinystories.py", "--preset", "micro", "--out-dir", str(run),
                           "--init-from-hf", str(src)], cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and f"{len(tokenizer)} tokens" in err and "128 rows" in err, err
    assert not run.exists()


def test_export_cli_writes_the_family_the_features_need_and_refuses_one_that_cannot_hold_them(tmp_path, tokenizer,
                                                                                            capsys):
    from safetensors import safe_open

    from tests.helpers import make_run

    torch.manual_seed(0)
    qwen3_like = build_model(tiny_config(qk_norm=True, explicit_head_dim=12, tie_embeddings=False))
    run = make_run(tmp_path / "run", {"dense": qwen3_like}, tokenizer)
    assert export_hf.main(["--checkpoint", run, "--out", str(tmp_path / "llama"), "--family", "llama"]) == 2
    assert "cannot write this model as llama: it has q/k norms" in capsys.readouterr().err
    assert not (tmp_path / "llama").exists()
    assert export_hf.main(["--checkpoint", run, "--out", str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert "as Qwen3ForCausalLM (bf16)" in capsys.readouterr().out
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    resolved = lambda c: replace(c, ffn_dim=c.hidden_dim, n_kv_heads=c.kv_heads)  # noqa: E731
    assert resolved(from_hf(str(tmp_path / "hf")).config) == resolved(qwen3_like.config)

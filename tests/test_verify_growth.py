"""verify_growth.py on pairs made the way public tools make them (tests/hf_pairs.py: LLaMA-Pro block expansion,
mergekit-moe / Megatron upcycling, HyperCloning width growth, each saved by transformers' save_pretrained) and
on this project's checkpoints: exit 0 for the correct ones, 1 for their broken variants with the failing check
named, 2 (one line, before any work) for pairs it cannot judge. The exit codes are also tested as real processes
(marked slow)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import verify_growth
from conftest import TEXT
from hf_pairs import build, from_state, hyperclone, llama_config, llama_pro, save, upcycle
from test_verify_growth_mechanics import make_model
from training.run_state.checkpoint import save_checkpoint
from transfer.simple_growth import dense_to_moe, scale_bilaterally

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _broken_expert(small):
    moe = upcycle(small, 4, 2, "random")
    sd = moe.state_dict()
    key = "model.layers.1.mlp.experts.gate_up_proj"
    sd[key][2] += 0.05 * torch.randn(sd[key][2].shape, generator=torch.Generator().manual_seed(0))
    return from_state(moe.config, sd)


def _relabelled_inconsistently(small):
    big = hyperclone(small, 2)
    sd = big.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    sd[key] = sd[key].view(8, 8, -1).roll(1, dims=0).reshape(sd[key].shape)  # q heads moved, k and o not
    return from_state(big.config, sd)


# name: (how BIG is made from SMALL, expected exit code, text the output must hold)
PAIRS = {
    "llama_pro": (lambda s: llama_pro(s, 2), 0, "BIG block 2: inserted, copies SMALL block 1"),
    "llama_pro_every_block": (lambda s: llama_pro(s, 1), 0, "BIG block 7: inserted"),
    "mergekit_random": (lambda s: upcycle(s, 4, 2, "random"), 0, "exact copies of SMALL's MLP: 4 of 4"),
    "mergekit_hidden": (lambda s: upcycle(s, 4, 2, "hidden", text=TEXT), 0, "dense -> 4 experts, top-2"),
    "megatron_8_experts": (lambda s: upcycle(s, 8, 2, "random", seed=1), 0, "dense -> 8 experts"),
    "hypercloning": (lambda s: hyperclone(s, 2), 0, "heads tiled"),
    "hypercloning_interleaved": (lambda s: hyperclone(s, 2, heads="interleaved", residual="interleaved"), 0,
                                 "residual interleaved"),
    "hypercloning_x3": (lambda s: hyperclone(s, 3), 0, "width x3"),
    "llama_pro_copies_not_zeroed": (lambda s: llama_pro(s, 2, zero=()), 1, "✗ FAILED  Functional"),
    "llama_pro_norms_zeroed": (lambda s: llama_pro(s, 2, zero=("input_layernorm", "post_attention_layernorm")), 1,
                               "✗ FAILED  Trainability"),
    "llama_pro_never_learn": (lambda s: llama_pro(s, 2, zero=("self_attn.o_proj", "self_attn.v_proj", "mlp.down_proj",
                                                              "mlp.up_proj")), 1, "✗ FAILED  Trainability"),
    "mergekit_expert_not_a_copy": (_broken_expert, 1, "✗ FAILED  Functional"),
    "mergekit_zero_router": (lambda s: upcycle(s, 4, 2, "zero"), 1, "✗ FAILED  Router integrity: routing has collapsed"),
    "hypercloning_no_noise": (lambda s: hyperclone(s, 2, noise=0.0), 1, "✗ FAILED  Symmetry"),
    "hypercloning_heads_relabelled_inconsistently": (_relabelled_inconsistently, 1, "✗ FAILED  RoPE"),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    small = build(llama_config())
    paths = {"small": save(small, str(root / "small"))}
    for name, (make, _, _) in PAIRS.items():
        paths[name] = save(make(small), str(root / name))
    return paths


def run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # what building the pairs printed (save_pretrained's progress bar) is not the script's
    code = verify_growth.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", PAIRS)
def test_pairs_grown_by_public_recipes(name, pairs, capsys, single_thread):
    code, out, err = run([pairs["small"], pairs[name]], capsys)
    expected, text = PAIRS[name][1:]
    assert code == expected, (name, out, err)
    assert "MAPPING (inferred from the configs and weights)" in out and "VERIFICATION SUMMARY" in out
    assert text in out, (name, out)
    if expected == 1:
        assert "CHECK(S) FAILED" in out and "Fix:" in out


def _save_variant(tmp_path, name: str, **overrides) -> str:
    return save(build(llama_config(**overrides), seed=3), str(tmp_path / name))


def test_exit_2_different_vocabularies(pairs, tmp_path, capsys):
    code, out, err = run([pairs["small"], _save_variant(tmp_path, "v", vocab_size=301)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "different vocabularies: SMALL has 300 tokens, BIG 301" in err


def test_exit_2_non_integer_width_factor(pairs, tmp_path, capsys):
    big = _save_variant(tmp_path, "w", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    code, out, err = run([pairs["small"], big], capsys)
    assert code == 2 and "width factor 48/32 = 1.5 is not an integer" in err and out == ""


def test_exit_2_architecture_it_does_not_read(pairs, tmp_path, capsys):
    from transformers import GPT2Config

    gpt2 = GPT2Config(vocab_size=300, n_embd=32, n_layer=4, n_head=4, n_positions=128)
    code, out, err = run([pairs["small"], save(build(gpt2), str(tmp_path / "gpt2"))], capsys)
    assert code == 2 and "unsupported architecture" in err and "'gpt2'" in err and err.count("\n") == 1


def test_exit_2_not_a_model_directory(pairs, tmp_path, capsys):
    code, _, err = run([pairs["small"], str(tmp_path / "missing")], capsys)
    assert code == 2 and "no such directory" in err
    os.makedirs(tmp_path / "empty")
    code, _, err = run([pairs["small"], str(tmp_path / "empty")], capsys)
    assert code == 2 and "neither a checkpoint directory nor a run directory" in err


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_weights_load_only_as_tensors(pairs, tmp_path, capsys):
    """A .bin checkpoint is read with weights_only=True: plain tensors load, a pickle carrying code is refused."""
    from safetensors.torch import load_file

    folder = save(build(llama_config()), str(tmp_path / "bin"))
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))  # the pre-safetensors format
    code, out, _ = run([str(tmp_path / "bin"), pairs["llama_pro"]], capsys)
    assert code == 0, out
    with open(tmp_path / "bin" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Payload()}, f)
    code, _, err = run([str(tmp_path / "bin"), pairs["llama_pro"]], capsys)
    assert code == 2 and "pytorch_model.bin holds" in err and "refused before loading it" in err, err


def test_tokens_file_and_report_page(pairs, tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text(TEXT[:5000], encoding="utf-8")
    page = tmp_path / "pair.html"
    code, out, _ = run([pairs["small"], pairs["hypercloning"], "--tokens", str(text), "--report", str(page)], capsys)
    assert code == 0 and f"UTF-8 bytes (mod vocab 300) of {text}" in out and f"wrote {page}" in out
    html = page.read_text()
    assert "Growth verification" in html and "Symmetry breaking" in html and "BIG block 3: original" in html
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.", encoding="utf-8")
    code, _, err = run([pairs["small"], pairs["hypercloning"], "--tokens", str(short)], capsys)
    assert code == 2 and "need 1024" in err


def _checkpoint(model, run_dir: str, phase: str) -> str:
    meta = {"phase": phase, "step": 1, "global_step": 1, "phase_done": True, "model_config": asdict(model.config)}
    return save_checkpoint(run_dir, model, {}, meta)


def test_project_checkpoints_and_run_directories(tmp_path, capsys, single_thread):
    """The project's own transitions, from checkpoint or run directories, and a project checkpoint against the
    transformers export of its growth."""
    from transfer.hf_format import export_hf

    tokens = torch.tensor(list(TEXT[:2048].encode()), dtype=torch.long).view(16, 128) % 300
    dense = make_model(0, tie_embeddings=False)
    moe = dense_to_moe(dense, 4, 2, calibration_tokens=tokens)
    grown = scale_bilaterally(moe, 2, 2, calibration_tokens=tokens)
    d = _checkpoint(dense, str(tmp_path / "dense_run"), "dense")
    _checkpoint(moe, str(tmp_path / "moe_run"), "moe")
    code, out, _ = run([d, str(tmp_path / "moe_run")], capsys)
    assert code == 0 and "project checkpoint moe-000001" in out and "exact copies of SMALL's MLP: 4 of 4" in out, out
    export_hf(grown, str(tmp_path / "grown_hf"))
    code, out, _ = run([str(tmp_path / "moe_run"), str(tmp_path / "grown_hf")], capsys)
    assert code == 0 and "BIG block 1: inserted, copies SMALL block 0" in out and "transformers Mixtral" in out, out
    broken = scale_bilaterally(moe, 2, 2, noise_std=0.0)
    _checkpoint(broken, str(tmp_path / "broken_run"), "grown")
    code, out, _ = run([str(tmp_path / "moe_run"), str(tmp_path / "broken_run")], capsys)
    assert code == 1 and "✗ FAILED  Symmetry breaking" in out


def _process(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "verify_growth.py"), *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_pro", "mergekit_random", "mergekit_zero_router", "llama_pro_copies_not_zeroed"])
def test_exit_codes_as_a_real_process(name, pairs):
    p = _process(pairs["small"], pairs[name])
    assert p.returncode == PAIRS[name][1], (p.stdout, p.stderr)
    assert "VERIFICATION SUMMARY" in p.stdout and "Traceback" not in p.stderr


@pytest.mark.slow
def test_exit_2_as_a_real_process(pairs, tmp_path):
    p = _process(pairs["small"], _save_variant(tmp_path, "v", vocab_size=301))
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "different vocabularies" in p.stderr

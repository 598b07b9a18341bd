"""sample.py: streams what the project's sampler generates, for every phase's checkpoint, deterministically."""
import os

import pytest
import torch
from torch import nn

import sample
from data import generate_stories
from models import build_model, generate
from tests.conftest import tiny_config
from tests.helpers import make_run
from transfer import dense_to_moe, scale_bilaterally

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """One run directory per phase (dense, upcycled MoE, grown MoE) of a tiny random model."""
    torch.manual_seed(0)
    dense = build_model(tiny_config(max_seq_len=32))
    moe = dense_to_moe(dense, 4, 2)
    grown = scale_bilaterally(moe, 2, 1)
    root = tmp_path_factory.mktemp("runs")
    return {phase: make_run(root / phase, {phase: m}, tokenizer)
            for phase, m in (("dense", dense), ("moe", moe), ("grown", grown))}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = sample.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def samples(out: str) -> list[str]:
    """The continuations printed (prompt included), one per sample."""
    parts = out.split(f"\n{sample.SEPARATOR}\n")
    assert parts[-1] == ""
    return parts[:-1]


def reference(run_dir: str, prompt: str, n: int, max_new: int, temperature: float, top_k: int | None, seed: int):
    """What one generate() call per sample gives with the same seed: the non-streamed path."""
    from training.run_state.checkpoint import find_checkpoint

    ckpt, _ = find_checkpoint(run_dir)
    model, tok = ckpt.load_model().eval(), sample.load_for_inference(run_dir, torch.device("cpu")).tokenizer
    ids = sample.prompt_ids(tok, prompt)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        full = generate(model, ids, max_new, temperature, top_k, tok.eos_token_id, gen)
        out.append(prompt + tok.decode(full[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    return out


@pytest.mark.parametrize("phase", ["dense", "moe", "grown"])
def test_streamed_samples_equal_generate_for_every_phase(capsys, runs, phase):
    code, out, err = run(capsys, "--checkpoint", runs[phase], "--prompt", "Once upon a time", "--num_samples", 2,
                         "--max_new_tokens", 20, "--seed", 3, "--device", "cpu")
    assert code == 0 and err == ""
    got = samples(out)
    assert got == reference(runs[phase], "Once upon a time", 2, 20, 0.8, 50, 3)
    assert got[0] != got[1] and all(s.startswith("Once upon a time") for s in got)


def test_same_seed_same_text_other_seed_other_text(capsys, runs):
    args = ["--checkpoint", runs["dense"], "--prompt", "Tom", "--max_new_tokens", 25, "--device", "cpu"]
    first, again, other = (run(capsys, *args, "--seed", s)[1] for s in (1, 1, 2))
    assert first == again and first != other


def greedy_by_hand(model, ids, n: int, eos: int) -> list[int]:
    """Argmax continuation, independent of generate(): each step sees the last max_seq_len tokens."""
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids[:, -model.config.max_seq_len:])[0, -1].argmax()
            if nxt.item() == eos:
                break
            new.append(nxt.item())
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return new


def test_temperature_zero_is_argmax(capsys, runs):
    code, out, _ = run(capsys, "--checkpoint", runs["moe"], "--prompt", "Lily", "--temperature", 0,
                       "--max_new_tokens", 15, "--seed", 1)
    assert code == 0
    loaded = sample.load_for_inference(runs["moe"], torch.device("cpu"))
    tok = loaded.tokenizer
    new = greedy_by_hand(loaded.model, sample.prompt_ids(tok, "Lily"), 15, tok.eos_token_id)
    assert len(new) > 3 and samples(out) == ["Lily" + tok.decode(new)]
    assert run(capsys, "--checkpoint", runs["moe"], "--prompt", "Lily", "--temperature", 0,
               "--max_new_tokens", 15, "--seed", 2)[1] == out  # greedy: the seed plays no part


def test_stops_at_the_eos_token_and_does_not_print_it(capsys, tmp_path, tokenizer):
    model = build_model(tiny_config())
    with torch.no_grad():
        model.norm.weight.zero_()  # every logit 0: argmax is token 0, the eos
    assert tokenizer.eos_token_id == 0
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer)
    code, out, _ = run(capsys, "--checkpoint", run_dir, "--prompt", "Hi", "--temperature", 0, "--num_samples", 2)
    assert code == 0 and samples(out) == ["Hi", "Hi"]


class Scripted(nn.Module):
    """Greedy 'model' that emits fixed tokens in turn, whatever it is shown."""

    def __init__(self, tokens: list[int], vocab: int):
        super().__init__()
        self.config = tiny_config(vocab_size=vocab, max_seq_len=8)
        self.tokens = tokens
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, ids):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.config.vocab_size)
        logits[:, -1, self.tokens[self.calls]] = 1.0
        self.calls += 1
        return logits


def test_stream_emits_only_whole_characters(tokenizer):
    text = "café ☕ ok 😀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters are split over byte tokens (the test means something)
    model = Scripted(ids + [tokenizer.eos_token_id], len(tokenizer))
    pieces = list(sample.stream_sample(model, tokenizer, torch.tensor([[0]]), 50, 0.0, None, torch.Generator()))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) < len(ids)  # some tokens waited for the next


def test_a_prompt_longer_than_the_context_is_cropped_to_its_last_tokens(capsys, runs, tokenizer):
    prompt = " ".join(generate_stories(3))
    ids = sample.prompt_ids(tokenizer, prompt)
    assert ids.shape[1] > 32  # the model's max_seq_len: it would refuse the whole prompt
    code, out, err = run(capsys, "--checkpoint", runs["dense"], "--prompt", prompt, "--max_new_tokens", 10,
                         "--temperature", 0)
    assert code == 0 and "sees only the last 32" in err and err.count("\n") == 1
    model = sample.load_for_inference(runs["dense"], torch.device("cpu")).model
    new = greedy_by_hand(model, ids[:, -32:], 10, tokenizer.eos_token_id)  # only the last 32 tokens, from the start
    assert new and samples(out) == [prompt + tokenizer.decode(new)]


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "NOWHERE"], "no such directory"),
    (["--checkpoint", "RUN", "--num_samples", "0"], "--num_samples=0 must be >= 1"),
    (["--checkpoint", "RUN", "--max_new_tokens", "-1"], "--max_new_tokens=-1 must be >= 1"),
    (["--checkpoint", "RUN", "--temperature", "-0.5"], "--temperature=-0.5 must be a number >= 0"),
    (["--checkpoint", "RUN", "--temperature", "nan"], "--temperature=nan"),
    (["--checkpoint", "RUN", "--top_k", "-3"], "--top_k=-3 must be >= 0"),
    (["--checkpoint", "RUN", "--seed", "x"], "invalid int value"),
    (["--checkpoint", "RUN", "--device", "tpu"], "--device 'tpu' is not a device"),
    pytest.param(["--checkpoint", "RUN", "--device", "cuda"], "torch.cuda.is_available() is False",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    (["--checkpoint", "RUN", "--bogus"], "unrecognized arguments: --bogus"),
    (["--prompt", "x"], "--checkpoint"),
])
def test_bad_input_exits_2_with_one_line(capsys, runs, argv, message):
    argv = [runs["dense"] if a == "RUN" else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_a_run_without_its_tokenizer_exits_2(capsys, tmp_path, tokenizer):
    run_dir = make_run(tmp_path / "run", {"dense": build_model(tiny_config())}, tokenizer)
    import shutil

    shutil.rmtree(os.path.join(run_dir, "tokenizer"))
    code, out, err = run(capsys, "--checkpoint", run_dir)
    assert code == 2 and "no tokenizer beside the checkpoints" in err and err.count("\n") == 1


def test_a_checkpoint_directory_is_accepted_as_well_as_a_run(capsys, runs):
    ckpt_dir = os.path.join(runs["grown"], "checkpoints", "grown-000001")
    by_run = run(capsys, "--checkpoint", runs["grown"], "--max_new_tokens", 8)
    assert run(capsys, "--checkpoint", ckpt_dir, "--max_new_tokens", 8) == by_run and by_run[0] == 0


def test_a_damaged_checkpoint_exits_2(capsys, tmp_path, tokenizer):
    run_dir = make_run(tmp_path / "run", {"dense": build_model(tiny_config())}, tokenizer)
    ckpt_dir = os.path.join(run_dir, "checkpoints", "dense-000001")
    with open(os.path.join(ckpt_dir, "model.safetensors"), "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    for path, message in ((ckpt_dir, "incomplete or corrupted"), (run_dir, "neither a checkpoint directory")):
        code, out, err = run(capsys, "--checkpoint", path)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1

"""evaluate.py and training/scoring.py: bits per byte by hand, across tokenizers, against transformers, on a run's
own validation split; bad input exits 2."""
import importlib.util
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import evaluate
from config import ModelConfig
from data import generate_stories, split_stories, train_tokenizer
from data.source import source_record
from models import build_model
from tests.conftest import tiny_config
from tests.helpers import make_run, trained_like_moe
from training.scoring import Score, score_stories, story_stream, windows
from training.settings import build_settings, place
from transfer import dense_to_moe, scale_bilaterally

pytestmark = pytest.mark.usefixtures("single_thread", "offline")

STORIES = ["Tom saw a big dog.", "Léa vit un chat 😀 près de l'école.\nThe end."]
EXTRA_BYTES = 1 + 3 + 1 + 1  # beyond one byte per character: é (2 bytes), 😀 (4), è (2), é (2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(max_seq_len=32)).eval()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------ (a) by hand
@pytest.mark.slow
def test_bits_per_byte_equals_a_hand_computation(tokenizer):
    torch.manual_seed(1)
    model = build_model(tiny_config(max_seq_len=128)).eval()  # one window holds the whole text
    eos = tokenizer.eos_token_id
    ids = [eos]
    for s in STORIES:
        ids += tokenizer.encode(s, add_special_tokens=False) + [eos]
    assert tokenizer.decode(ids[1:], skip_special_tokens=True) == "".join(STORIES)  # the bytes are the text's
    with torch.no_grad():
        logp = model.double()(torch.tensor([ids[:-1]])).log_softmax(-1)[0]  # float64 reference
    nats = -sum(logp[i, t].item() for i, t in enumerate(ids[1:]))
    n_bytes = sum(len(s) for s in STORIES) + EXTRA_BYTES

    score = score_stories(model.float(), tokenizer, STORIES, context=128)
    assert (score.tokens, score.bytes, score.stories) == (len(ids) - 1, n_bytes, 2)
    assert score.bits_per_byte == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert score.loss_per_token == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)


@pytest.mark.parametrize("context, stride", [(16, 16), (16, 8), (16, 5), (16, 1)])
def test_every_token_is_predicted_once_with_the_documented_context(tokenizer, model, context, stride):
    """Each prediction after the first window sees the window's full context minus the stride's new tokens."""
    stories = generate_stories(2, seed=1)
    stream = story_stream(stories, tokenizer)
    n = len(stream) - 1
    assert n > 3 * context
    nats = 0.0
    with torch.no_grad():
        for t in range(1, n + 1):  # target t, predicted from stream[start:t] as the module docstring states
            end = t if t <= context else min(n, context + math.ceil((t - context) / stride) * stride)
            start = max(0, end - context)
            assert t <= context or t - start >= context - stride + 1
            nats -= model(stream[None, start:t])[0, -1].log_softmax(-1)[stream[t]].item()
    score = score_stories(model, tokenizer, stories, batch_size=3, context=context, stride=stride)
    assert score.tokens == n and score.nats == pytest.approx(nats, rel=1e-5)


def test_windows_cover_each_target_exactly_once():
    for n, context, stride in [(1, 8, 8), (7, 8, 4), (8, 8, 8), (9, 8, 8), (100, 16, 5), (100, 16, 16)]:
        spans = windows(n, context, stride)
        scored = [t for s, e, new in spans for t in range(e - new + 1, e + 1)]
        assert scored == list(range(1, n + 1))
        assert all(e - s == min(n, context) for s, e, _ in spans) and spans[0][0] == 0
    with pytest.raises(ValueError, match="stride=9"):
        windows(10, 8, 9)


def test_a_score_reports_what_its_totals_say():
    s = Score(nats=100.0, tokens=50, bytes=200, stories=3)
    assert (s.loss_per_token, s.perplexity) == (2.0, math.exp(2.0))
    assert s.bits_per_byte == pytest.approx(100 / math.log(2) / 200)


# ------------------------------------------------------------------------------------------ (b) tokenizers
SYMBOLS = "abcde "


def markov_text(n_stories: int, length: int, seed: int) -> tuple[list[str], float]:
    """Stories from a fixed order-1 Markov chain over 5 letters and space, and its entropy rate in bits per byte
    (ASCII: one byte per character): no model can do better on average, whatever its tokenizer."""
    g = torch.Generator().manual_seed(0)
    P = (torch.rand(6, 6, generator=g, dtype=torch.float64) ** 3 + 0.02)
    P[5, 5] = 0  # no double spaces: the pre-tokenizer keeps words apart
    P /= P.sum(1, keepdim=True)
    w, v = torch.linalg.eig(P.T)
    pi = v[:, w.real.argmax()].real
    pi /= pi.sum()
    rate = float((pi * -(P * torch.where(P > 0, P.log2(), torch.zeros_like(P))).sum(1)).sum())
    rng, rows = random.Random(seed), P.tolist()
    stories = []
    for _ in range(n_stories):
        state, chars = rng.randrange(5), []
        for _ in range(length):
            chars.append(SYMBOLS[state])
            state = rng.choices(range(6), rows[state])[0]
        stories.append("".join(chars).strip())
    return stories, rate


def train_briefly(tokenizer, stories: list[str], steps: int = 250) -> torch.nn.Module:
    """The same small model, seed and optimiser for every tokenizer; only the vocabulary size differs."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=4, max_seq_len=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    stream, gen = story_stream(stories, tokenizer), torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = stream[torch.randint(0, len(stream) - 33, (16, 1), generator=gen) + torch.arange(33)]
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_bits_per_byte_agrees_across_tokenizers_where_loss_per_token_does_not():
    """Both tokenizers are trained on the same text; both models have the same shape, seed, optimiser and steps,
    and differ only in vocabulary size. Measured (250 steps; data seeds 1 and 3): vocab 300 3.44 / 3.51 nats per
    token, 2.296 / 2.327 bits per byte; vocab 600 5.25 / 5.23 nats per token, 2.410 / 2.391 bits per byte; the
    source's entropy is 2.165. Per token the losses differ by half (0.46 against 0.32 tokens per byte); per byte
    they differ by 3-5% (7% after 500 steps), and that is real: the larger vocabulary has fewer examples per
    token and is further from the source's entropy after the same training. Tolerance 10%."""
    train, rate = markov_text(200, 600, seed=1)
    val, _ = markov_text(30, 600, seed=2)
    scores = {}
    for vocab in (300, 600):
        tok = train_tokenizer(train, vocab)
        scores[vocab] = score_stories(train_briefly(tok, train), tok, val, batch_size=16)
    small, large = scores[300], scores[600]
    assert small.bytes == large.bytes and small.tokens > 1.3 * large.tokens
    assert large.loss_per_token > 1.3 * small.loss_per_token  # per token: not comparable
    assert large.bits_per_byte == pytest.approx(small.bits_per_byte, rel=0.10)  # per byte: the same text's bits
    for s in (small, large):  # near the source's entropy, and not below it (18 kB: the sample's noise is ~0.01)
        assert 0.98 * rate < s.bits_per_byte < 1.25 * rate


# ------------------------------------------------------------------------------------------ (c) transformers
@pytest.mark.slow
@pytest.mark.parametrize("phase", ["dense", "moe", "grown"])
def test_bits_per_byte_equals_what_transformers_computes(tmp_path, tokenizer, model, phase):
    """Measured in fp32: relative difference 5e-9 (dense, Llama), 8e-9 (MoE) and 6e-9 (grown; both Mixtral)."""
    from transformers import AutoModelForCausalLM

    from transfer.hf_format import export_hf

    torch.manual_seed(2)
    moe = trained_like_moe(model)  # experts apart and a strong router: routing changes the function
    ours = {"dense": model, "moe": moe, "grown": scale_bilaterally(moe, 2, 1)}[phase].eval()
    export_hf(ours, str(tmp_path / "hf"), tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    stories = generate_stories(6, seed=2) + STORIES
    stream, context, stride = story_stream(stories, tokenizer), 32, 12
    nats = 0.0
    with torch.no_grad():
        for start, end, new in windows(len(stream) - 1, context, stride):
            ids = stream[None, start:end + 1]  # inputs and the targets; transformers shifts the labels itself
            labels = ids.clone()
            labels[:, :ids.shape[1] - new] = -100  # only the window's new predictions count
            nats += hf(input_ids=ids, labels=labels).loss.item() * new  # mean over the `new` labels -> sum
    theirs = nats / math.log(2) / sum(len(s.encode()) for s in stories)
    score = score_stories(ours, tokenizer, stories, batch_size=4, context=context, stride=stride)
    assert score.bits_per_byte == pytest.approx(theirs, rel=1e-6)


# ------------------------------------------------------------------------------------------ (d) the run's data
def settings_dict(**flat) -> dict:
    return build_settings("micro", place(flat)).to_dict()


def scored(capsys, *argv) -> dict:
    code, out, err = run(capsys, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def test_default_data_is_the_validation_split_of_the_runs_files(tmp_path, capsys, tokenizer, model):
    stories = generate_stories(60, seed=3)
    path = tmp_path / "stories.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    settings = settings_dict(val_fraction=0.2, seed=5, max_stories=10, seq_len=16, max_seq_len=32)
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer, settings, source_record("files", [str(path)]))
    val = split_stories(stories, 0.2, 5)[1]  # max_stories caps training stories, never the held-out ones
    got = scored(capsys, "--checkpoint", run_dir)
    want = score_stories(model, tokenizer, val, context=16, stride=8)
    assert (got["stories"], got["bytes"], got["context"]) == (12, want.bytes, 16)  # the run's training seq_len
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)
    assert "val_fraction 0.2, seed 5" in got["data"] and "stories.txt" in got["data"]

    path.write_text(path.read_text() + "One more story.\n<|endoftext|>\n")  # another file: another split
    code, _, err = run(capsys, "--checkpoint", run_dir)
    assert code == 2 and "changed since the run read it" in err and err.count("\n") == 1
    os.remove(path)
    code, _, err = run(capsys, "--checkpoint", run_dir)
    assert code == 2 and "is gone" in err and err.count("\n") == 1


def test_default_data_is_the_validation_split_of_generated_stories(tmp_path, capsys, tokenizer, model):
    settings = settings_dict(val_fraction=0.1, seed=7, offline_stories=50)
    run_dir = make_run(tmp_path / "run", {"moe": dense_to_moe(model, 4, 2)}, tokenizer, settings,
                       {"origin": "generated"})
    val = split_stories(generate_stories(50, seed=7), 0.1, 7)[1]
    got = scored(capsys, "--checkpoint", run_dir, "--stride", 32)
    want = score_stories(dense_to_moe(model, 4, 2), tokenizer, val, context=32, stride=32)
    assert (got["stories"], got["bytes"], got["context"], got["stride"]) == (5, want.bytes, 32, 32)
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)
    assert "generated" in got["data"]


def test_default_data_is_the_validation_split_of_a_prepared_dataset(tmp_path, capsys, model):
    prepared = pytest.importorskip("data.prepared")
    path = tmp_path / "stories.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in generate_stories(80, seed=6) + STORIES))
    ds = prepared.prepare_dataset(str(tmp_path / "ds"), [str(path)], 300, val_fraction=0.1, seed=2, workers=1,
                                  tokenizer_sample_bytes=20_000, log=lambda _: None)
    run_dir = make_run(tmp_path / "run", {"dense": model}, ds.tokenizer, settings_dict(), ds.source_record())
    val = ds.val_stories()
    got = scored(capsys, "--checkpoint", run_dir)
    want = score_stories(model, ds.tokenizer, val)
    assert (got["stories"], got["bytes"]) == (8, want.bytes) and "prepared dataset" in got["data"]
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)

    record = json.load(open(os.path.join(run_dir, "data_source.json")))
    json.dump(dict(record, fingerprint="0" * 64), open(os.path.join(run_dir, "data_source.json"), "w"))
    code, _, err = run(capsys, "--checkpoint", run_dir)
    assert code == 2 and "holds other data" in err and err.count("\n") == 1


def test_prepared_origin_without_its_module_exits_2(tmp_path, capsys, tokenizer, model):
    if importlib.util.find_spec("data.prepared") is not None:
        pytest.skip("data/prepared.py exists: the prepared origin is read, not refused")
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer, settings_dict(),
                       {"origin": "prepared", "path": str(tmp_path / "prep")})
    code, _, err = run(capsys, "--checkpoint", run_dir)
    assert code == 2 and "data/prepared.py is not in this checkout" in err and err.count("\n") == 1


@pytest.mark.slow
def test_data_files_score_all_their_stories_or_the_first_n(tmp_path, capsys, tokenizer, model):
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer)  # no settings, no source: files needed
    stories = generate_stories(9, seed=4) + STORIES
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    got = scored(capsys, "--checkpoint", run_dir, "--data-files", path)
    want = score_stories(model, tokenizer, stories)  # no recorded seq_len: max_seq_len, stride half of it
    assert (got["stories"], got["tokens"], got["bytes"], got["context"]) == (11, want.tokens, want.bytes, 32)
    assert got["nats"] == pytest.approx(want.nats, rel=1e-6)
    got = scored(capsys, "--checkpoint", run_dir, "--data_files", path, "--max-stories", 3)
    assert got["stories"] == 3 and got["bytes"] == sum(len(s.encode()) for s in stories[:3])


def test_the_text_block_shows_every_figure(tmp_path, capsys, tokenizer, model):
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer)
    path = tmp_path / "s.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES))
    code, out, _ = run(capsys, "--checkpoint", run_dir, "--data-files", path)
    want = score_stories(model, tokenizer, STORIES)
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["bits/byte"] == f"{want.bits_per_byte:.5f}" and lines["perplexity"] == f"{want.perplexity:.4f}"
    assert lines["loss"] == f"{want.loss_per_token:.5f} nats per token" and "s.txt (2 stories)" in lines["data"]


# ------------------------------------------------------------------------------------------ (e) bad input
@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "NOWHERE"], "no such directory"),
    ([], "--checkpoint"),
    (["--checkpoint", "RUN", "--max_stories", "0"], "--max_stories=0 must be >= 1"),
    (["--checkpoint", "RUN", "--batch_size", "0"], "--batch_size=0 must be >= 1"),
    (["--checkpoint", "RUN", "--context", "64"], "--context=64 exceeds the model's max_seq_len=32"),
    (["--checkpoint", "RUN", "--context", "16", "--stride", "17"], "--stride=17 exceeds the context of 16"),
    (["--checkpoint", "RUN", "--data-files", "missing.txt"], "missing.txt: no such file"),
    (["--checkpoint", "RUN", "--device", "gpu"], "--device 'gpu' is not a device"),
    pytest.param(["--checkpoint", "RUN", "--device", "cuda"], "torch.cuda.is_available() is False",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    (["--checkpoint", "RUN", "--max_stories", "many"], "invalid int value"),
    (["--checkpoint", "RUN"], "no data_source.json"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, tokenizer, model, argv, message):
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer)
    code, out, err = run(capsys, *[run_dir if a == "RUN" else a for a in argv])
    assert code == 2 and out == "" and message in err and err.count("\n") == 1 and err.startswith("error: ")

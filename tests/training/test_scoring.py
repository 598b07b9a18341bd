"""training/scoring.py: bits per byte by hand, every token predicted once with the documented context, across
tokenizers, and against what transformers computes."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from config import ModelConfig
from data import train_tokenizer
from data.synthetic import generate_stories
from models import build_model
from tests.conftest import tiny_config
from tests.helpers import trained_like_moe
from training.scoring import Score, score_stories, story_stream, windows
from transfer import scale_bilaterally

pytestmark = pytest.mark.usefixtures("single_thread")

STORIES = ["Tom saw a big dog.", "Léa vit un chat 😀 près de l'école.\nThe end."]
EXTRA_BYTES = 1 + 3 + 1 + 1  # beyond one byte per character: é (2 bytes), 😀 (4), è (2), é (2)


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

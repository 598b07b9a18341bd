"""Data layer: corpus loading (files, hub, offline fallback), tokenizer, token cache, batches. All text is generated."""
import json
import os
import time

import numpy as np
import pytest
import torch

import data.text as text_mod
from data.synthetic import generate_stories
from data.text import EOT, DataError, load_corpus, split_stories
from data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from data.tokens import TokenBatches, eval_batches, tokenize_to_cache

STORIES = generate_stories(300, seed=0)


def paragraphs(story: str) -> str:
    """The story with its sentences as paragraphs (single newlines), as in TinyStories."""
    return story.replace(". ", ".\n")


def write_txt(path, stories, newline="\n") -> str:
    """The official TinyStories layout: each story followed by a line holding exactly <|endoftext|>."""
    path.write_text("".join(f"{s}\n{EOT}\n" for s in stories).replace("\n", newline), encoding="utf-8")
    return str(path)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(generate_stories(400, seed=1), vocab_size=400)


# ---------------------------------------------------------------- local files

def test_txt_official_layout(tmp_path):
    stories = [paragraphs(s) for s in STORIES[:40]]
    corpus = load_corpus([write_txt(tmp_path / "a.txt", stories)], val_fraction=0.1)
    assert sorted(corpus.train + corpus.val) == sorted(stories)
    assert "\n" in corpus.train[0] and len(corpus.val) == 4
    assert corpus.source == "local files: a.txt (40 stories)"


def test_txt_crlf_blank_stories_and_unterminated_last_story(tmp_path):
    path = tmp_path / "b.txt"
    path.write_bytes(f"\ufeff  first\r\nstory  \r\n{EOT}\r\n\r\n{EOT}\r\nsecond\r\n{EOT}\r\nthird, no separator\n"
                     .encode())
    corpus = load_corpus([str(path)], val_fraction=0.3)
    assert sorted(corpus.train + corpus.val) == ["first\nstory", "second", "third, no separator"]


def test_txt_read_in_pieces_matches_whole(tmp_path, monkeypatch):
    path = write_txt(tmp_path / "a.txt", [paragraphs(s) for s in STORIES[:20]])
    whole = text_mod._read_txt(path)
    monkeypatch.setattr(text_mod, "_CHUNK_BYTES", 7)  # pieces end mid-story, lines completed by readline
    assert text_mod._read_txt(path) == whole and len(whole) == 20


def test_json_and_jsonl(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": s, "id": i} for i, s in enumerate(STORIES[:10])]
                        + [{"text": "   ", "id": 99}])
    (tmp_path / "b.json").write_text(json.dumps([{"text": s} for s in STORIES[10:15]]), encoding="utf-8")
    corpus = load_corpus([jsonl, str(tmp_path / "b.json")], val_fraction=0.2)
    assert sorted(corpus.train + corpus.val) == sorted(STORIES[:15])
    assert corpus.source == "local files: a.jsonl (10 stories), b.json (5 stories)"


def _bad_file(tmp_path, case: str) -> str:
    """A file with the named problem."""
    files = {
        "missing": None,
        "directory": None,
        "empty": b"",
        "no separator": b"Once upon a time there was one long story.\nThe end.\n",
        "not utf-8": f"ok story\n{EOT}\ncaf".encode() + b"\xe9\n" + f"{EOT}\n".encode(),
        "no text field": b'{"story": "a"}\n{"story": "b"}\n',
        "bad json": b'{"text": "a"\n',
        "extension": b"text",
    }
    name = {"no text field": "x.jsonl", "bad json": "x.jsonl", "extension": "x.csv"}.get(case, "x.txt")
    path = tmp_path / name
    if case == "directory":
        path.mkdir()
    elif files[case] is not None:
        path.write_bytes(files[case])
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file; check the path"),
    ("directory", "is a directory, not a file"),
    ("empty", "empty file"),
    ("no separator", f"no line holding exactly {EOT}"),
    ("not utf-8", "undecodable byte at offset 26"),
    ("no text field", "no 'text' field (fields: story); rename"),
    ("bad json", "not readable as JSON records"),
    ("extension", "unsupported extension '.csv'; use .txt"),
])
def test_file_errors_are_one_line_with_the_fix(tmp_path, case, expected):
    path = _bad_file(tmp_path, case)
    with pytest.raises(DataError) as err:
        load_corpus([path])
    message = str(err.value)
    assert message.startswith(path) and expected in message and "\n" not in message


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_txt(tmp_path / "a.txt", STORIES[:3])

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(text_mod, "open", denied, raising=False)  # chmod does not stop root
    with pytest.raises(DataError, match=r"a\.txt: cannot be read \(Permission denied\); fix its permissions"):
        load_corpus([path])


def test_every_file_is_checked_before_any_is_parsed(tmp_path):
    bad_bytes = _bad_file(tmp_path, "not utf-8")  # only parsing would find this one
    with pytest.raises(DataError, match="no such file"):
        load_corpus([bad_bytes, str(tmp_path / "missing.txt")])


def test_argument_errors(tmp_path):
    path = write_txt(tmp_path / "a.txt", STORIES[:3])
    with pytest.raises(DataError, match="val_fraction=1.0 must be between 0 and 1"):
        load_corpus([path], val_fraction=1.0)
    with pytest.raises(DataError, match="no data files given"):
        load_corpus([])
    with pytest.raises(DataError, match="only 1 story"):
        load_corpus([write_txt(tmp_path / "one.txt", STORIES[:1])])


# ---------------------------------------------------------------- split

def test_split_is_deterministic_disjoint_and_keeps_validation():
    train, val = split_stories(STORIES, 0.1, seed=3)
    assert (train, val) == split_stories(STORIES, 0.1, seed=3)
    assert split_stories(STORIES, 0.1, seed=4) != (train, val)
    assert len(val) == 30 and not set(train) & set(val) and sorted(train + val) == sorted(STORIES)
    assert len(split_stories(STORIES[:5], 0.01, seed=0)[1]) == 1  # at least one validation story


def test_max_stories_caps_training_only(tmp_path):
    path = write_txt(tmp_path / "a.txt", STORIES[:100])
    full, capped = load_corpus([path], val_fraction=0.1), load_corpus([path], val_fraction=0.1, max_stories=7)
    assert capped.train == full.train[:7] and capped.val == full.val


# ---------------------------------------------------------------- hub and offline fallback

def test_offline_switch_skips_the_hub(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was called"))
    lines: list[str] = []
    corpus = load_corpus(None, offline_stories=200, log=lines.append)
    assert len(lines) == 1 and "HF_HUB_OFFLINE=1 is set" in lines[0] and "NOT TinyStories" in lines[0]
    assert "NOT TinyStories" in corpus.source and len(corpus.train) + len(corpus.val) == 200


def test_unreachable_hub_fails_over_in_seconds(monkeypatch, no_hub_switches):
    import datasets

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there, whether or not online
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)  # a proxy would answer for the closed port
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was called"))
    lines: list[str] = []
    start = time.perf_counter()
    corpus = load_corpus(None, offline_stories=500, max_stories=100, log=lines.append)
    assert time.perf_counter() - start < 5
    assert len(lines) == 1 and "http://127.0.0.1:9 unreachable" in lines[0]
    assert corpus.source.startswith("generated template stories (NOT TinyStories")
    assert len(corpus.train) == 100 and len(corpus.val) == 25


def test_hanging_probe_gives_up_at_the_timeout(monkeypatch, no_hub_switches):
    monkeypatch.setattr(text_mod.urllib.request, "urlopen", lambda *a, **k: time.sleep(10))
    start = time.perf_counter()
    reason = text_mod._probe_hub(0.3)
    assert time.perf_counter() - start < 2 and "no answer from" in reason and "within 0.3 s" in reason


def test_failing_load_dataset_falls_back(monkeypatch, no_hub_switches):
    import datasets

    def refuse(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(text_mod, "_probe_hub", lambda timeout: None)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    lines: list[str] = []
    corpus = load_corpus(None, offline_stories=100, log=lines.append)
    assert len(lines) == 1 and "loading roneneldan/TinyStories failed: ConnectionError: Couldn't reach" in lines[0]
    assert "NOT TinyStories" in corpus.source


class FakeStream:
    """An endless streaming split that counts the records taken from it."""

    def __init__(self, stories: list[str]):
        self.stories, self.taken = stories, 0

    def __iter__(self):
        while True:
            self.taken += 1
            yield {"text": self.stories[(self.taken - 1) % len(self.stories)]}


def test_hub_branch_streams_train_and_validation(monkeypatch, no_hub_switches):
    import datasets

    calls = []
    splits = {"train": FakeStream(STORIES[:200]), "validation": [{"text": s} for s in STORIES[200:220]]}

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return splits

    monkeypatch.setattr(text_mod, "_probe_hub", lambda timeout: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    lines: list[str] = []
    corpus = load_corpus(None, max_stories=50, log=lines.append)
    assert calls == [("roneneldan/TinyStories", {"streaming": True})] and not lines
    assert splits["train"].taken == 50 and corpus.train == STORIES[:50] and corpus.val == STORIES[200:220]
    assert corpus.source.startswith("TinyStories from the Hugging Face hub (roneneldan/TinyStories")


def test_hub_without_validation_split_holds_out(monkeypatch, no_hub_switches):
    import datasets

    monkeypatch.setattr(text_mod, "_probe_hub", lambda timeout: None)
    monkeypatch.setattr(text_mod, "HUB_DEFAULT_STORIES", 40)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: {"train": FakeStream(STORIES[:100])})
    corpus = load_corpus(None, val_fraction=0.25, hub_dataset="someone/stories")
    assert len(corpus.train) == 30 and len(corpus.val) == 10 and not set(corpus.train) & set(corpus.val)
    assert corpus.source.startswith("stories from the Hugging Face hub (someone/stories")


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_eos(tok):
    assert len(tok) == 400 and tok.eos_token == EOT and tok.eos_token_id == 0
    for s in STORIES[:20] + ['Café, naïve "quotes" — 😀\n\n  two  spaces\tand a tab. ', " , ."]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s and 0 not in ids  # encode adds no special tokens
    assert len(tok.encode(STORIES[0])) < len(STORIES[0].encode()) / 2  # merges were learned
    assert tok.encode(EOT) == [0]


def test_tokenizer_save_load_offline(tok, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = tmp_path / "tok"
    save_tokenizer(tok, str(directory))
    save_tokenizer(tok, str(directory))  # over an existing one
    assert sorted(os.listdir(tmp_path)) == ["tok"]  # no temporary directories left behind
    for loaded in (load_tokenizer(str(directory)), AutoTokenizer.from_pretrained(str(directory))):
        assert loaded.eos_token_id == 0 and loaded.encode(STORIES[0]) == tok.encode(STORIES[0])
        assert loaded.decode(loaded.encode(STORIES[1] + " , .")) == STORIES[1] + " , ."
    with pytest.raises(DataError, match="no tokenizer.json there; train and save one first"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_tokenizer_vocab_size_limits():
    with pytest.raises(DataError, match="vocab_size=256 is too small.*use vocab_size >= 257"):
        train_tokenizer(STORIES[:10], 256)
    assert len(train_tokenizer(STORIES[:10], 257)) == 257  # bytes and eos only: still round-trips
    assert len(train_tokenizer(STORIES[:50], 512)) <= 512


# ---------------------------------------------------------------- token cache

def test_cache_layout_content_and_hit(tok, tmp_path, monkeypatch):
    stories = STORIES[:30]
    ids = tokenize_to_cache(stories, tok, str(tmp_path))
    expected = [i for s in stories for i in tok.encode(s) + [0]]
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and not ids.flags.writeable
    assert ids.tolist() == expected
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0].endswith(".bin") and names[1].endswith(".json")
    assert json.loads((tmp_path / names[1]).read_text())["n_tokens"] == len(expected)

    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: pytest.fail("tokenized again"))
    again = tokenize_to_cache(stories, tok, str(tmp_path))
    assert again.tolist() == expected and sorted(os.listdir(tmp_path)) == names


def test_cache_key_follows_stories_and_tokenizer(tok, tmp_path):
    other_tok = train_tokenizer(generate_stories(400, seed=1), vocab_size=300)
    tokenize_to_cache(STORIES[:10], tok, str(tmp_path))
    tokenize_to_cache(STORIES[:11], tok, str(tmp_path))
    tokenize_to_cache(STORIES[:10], other_tok, str(tmp_path))
    tokenize_to_cache(["ab", "c"] + STORIES[2:10], tok, str(tmp_path))
    tokenize_to_cache(["a", "bc"] + STORIES[2:10], tok, str(tmp_path))
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".bin")]) == 5


def test_truncated_cache_is_rebuilt(tok, tmp_path):
    ids = tokenize_to_cache(STORIES[:10], tok, str(tmp_path)).tolist()
    (bin_path,) = [tmp_path / n for n in os.listdir(tmp_path) if n.endswith(".bin")]
    bin_path.write_bytes(bin_path.read_bytes()[:10])
    assert tokenize_to_cache(STORIES[:10], tok, str(tmp_path)).tolist() == ids


def test_cache_rejects_vocab_beyond_uint16(tmp_path):
    class Huge:
        eos_token_id = 0

        def __len__(self):
            return 70_000

    with pytest.raises(DataError, match="70,000 tokens does not fit the uint16"):
        tokenize_to_cache(STORIES[:2], Huge(), str(tmp_path))


# ---------------------------------------------------------------- batches

TOKENS = np.arange(5000, dtype=np.uint16)  # each window of consecutive ids shows where it was cut


def test_batches_shapes_and_shift():
    x, y = TokenBatches(TOKENS, batch_size=4, seq_len=16, seed=0).next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one: the next token of the text
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # contiguous windows


def test_batches_deterministic_per_seed_and_rank():
    def draw(**kw):
        b = TokenBatches(TOKENS, 4, 16, **kw)
        return [b.next()[0] for _ in range(3)]

    assert all(torch.equal(a, b) for a, b in zip(draw(seed=1), draw(seed=1)))
    assert not torch.equal(draw(seed=1)[0], draw(seed=2)[0])
    ranks = [draw(seed=1, rank=r, world_size=2)[0] for r in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])
    assert torch.equal(ranks[1], draw(seed=1, rank=1, world_size=2)[0])


def test_batches_resume_exactly():
    b = TokenBatches(TOKENS, 4, 16, seed=5)
    for _ in range(3):
        b.next()
    state = json.loads(json.dumps(b.state_dict()))  # plain values: survives a checkpoint
    expected = [b.next() for _ in range(2)]
    resumed = TokenBatches(TOKENS, 4, 16, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [resumed.next() for _ in range(2)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(DataError, match="saved with seed=5 \\(now 6\\)"):
        TokenBatches(TOKENS, 4, 16, seed=6).load_state_dict(state)


def test_batches_need_enough_text():
    with pytest.raises(DataError, match="too little text for one batch: 16 tokens, need 17; add data or lower"):
        TokenBatches(TOKENS[:16], 2, 16, seed=0)
    x, y = TokenBatches(TOKENS[:17], 2, 16, seed=0).next()  # exactly one window fits
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[1], torch.arange(1, 17))


def test_eval_batches_are_consecutive_windows():
    batches = eval_batches(TOKENS, batch_size=4, seq_len=100, max_batches=3)
    assert len(batches) == 3 and all(x.shape == (4, 100) for x, _ in batches)
    firsts = torch.cat([x[:, 0] for x, _ in batches])
    assert torch.equal(firsts, torch.arange(0, 1200, 100))  # from the start, no overlap, no gap
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(eval_batches(TOKENS, 4, 100, max_batches=100)) == 12  # 49 windows -> 12 full batches
    (small,) = eval_batches(TOKENS[:250], 4, 100, max_batches=5)  # 2 windows: one smaller batch
    assert small[0].shape == (2, 100)
    with pytest.raises(DataError, match="too little text"):
        eval_batches(TOKENS[:100], 4, 100, max_batches=1)


def test_end_to_end_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = load_corpus(None, offline_stories=300, log=lambda line: None)
    tok = train_tokenizer(corpus.train, 384)
    train = TokenBatches(tokenize_to_cache(corpus.train, tok, str(tmp_path)), 8, 64, seed=0)
    x, y = train.next()
    assert int(x.max()) < len(tok) and (tokenize_to_cache(corpus.val, tok, str(tmp_path)) == 0).sum() == 15

"""Prepared datasets: files (.txt, .jsonl), a stand-in hub and generated stories give exactly the tokens a run would
make; 1 and 2 workers agree byte for byte; opening refuses anything incomplete; nothing half-written is left."""
import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import data.prepared as prepared
import data.text as text_mod
import prepare_data
from data.synthetic import generate_stories
from data.text import EOT, DataError, load_corpus
from data.tokenizer import load_tokenizer
from data.tokens import _encode
from common.files import WriteFailed
from tests.helpers import ROOT

STORIES = generate_stories(240, seed=3)
TRICKY = ['Café, naïve "quotes" — 😀\nnew paragraph', "two  spaces\tand a tab", "ends with dots..."]
SMALL = dict(val_fraction=0.1, seed=1, workers=1, tokenizer_sample_bytes=20_000, log=lambda _: None)
VOCAB = 300


def write_txt(path, stories) -> str:
    path.write_text("".join(f"{s}\n{EOT}\n" for s in stories), encoding="utf-8")
    return str(path)


def write_jsonl(path, stories) -> str:
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories), encoding="utf-8")
    return str(path)


def direct_tokens(ds, stories: list[str]) -> np.ndarray:
    """What data/tokens.py caches for these stories with the dataset's tokenizer: each story followed by eos."""
    tok = load_tokenizer(os.path.join(ds.path, "tokenizer"))
    return _encode(stories, tok, tok.eos_token_id)


def read(*path) -> bytes:
    with open(os.path.join(*path), "rb") as f:
        return f.read()


def leftovers(tmp_path) -> list[str]:
    return sorted(n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n)


@pytest.fixture(scope="module")
def txt_dataset(tmp_path_factory):
    """A dataset prepared from a .txt file, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("txt")
    files = [write_txt(tmp / "a.txt", STORIES[:150] + TRICKY), write_txt(tmp / "b.txt", STORIES[150:])]
    return prepared.prepare_dataset(str(tmp / "ds"), files, VOCAB, **SMALL), files


# ------------------------------------------------------------------------------------------ the sources

def test_txt_tokens_equal_tokenizing_what_a_run_reads(txt_dataset):
    ds, files = txt_dataset
    corpus = load_corpus(files, val_fraction=0.1, seed=1)
    assert np.array_equal(ds.train_tokens, direct_tokens(ds, corpus.train))
    assert np.array_equal(ds.val_tokens, direct_tokens(ds, corpus.val))
    assert ds.train_tokens.dtype == np.uint16 and not ds.train_tokens.flags.writeable
    m = ds.meta
    assert m["train"]["n_stories"] == len(corpus.train) and m["val"]["n_stories"] == len(corpus.val)
    assert m["train"]["n_bytes"] == sum(len(s.encode()) for s in corpus.train)
    assert m["train"]["n_tokens"] == len(ds.train_tokens) and ds.vocab_size == VOCAB == len(ds.tokenizer)
    assert [f["path"] for f in m["source"]["files"]] == [os.path.abspath(f) for f in files]
    assert sorted(os.listdir(ds.path)) == ["prepared.json", "tokenizer", "train.bin", "val.bin"]


def test_val_stories_round_trip_exactly(txt_dataset):
    ds, files = txt_dataset
    val = load_corpus(files, val_fraction=0.1, seed=1).val
    assert ds.val_stories() == val and len(val) == ds.meta["val"]["n_stories"]


def test_tricky_text_round_trips_through_val_stories(tmp_path):
    stories = TRICKY * 4 + STORIES[:20]
    ds = prepared.prepare_dataset(str(tmp_path / "ds"), [write_jsonl(tmp_path / "t.jsonl", stories)], VOCAB,
                                  **(SMALL | dict(val_fraction=0.5)))
    val = load_corpus([str(tmp_path / "t.jsonl")], val_fraction=0.5, seed=1).val
    assert ds.val_stories() == val and set(TRICKY) & set(val)


def test_jsonl_matches_direct_tokenizing(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", STORIES[:80])
    ds = prepared.prepare_dataset(str(tmp_path / "ds"), [path], VOCAB, **SMALL)
    corpus = load_corpus([path], val_fraction=0.1, seed=1)
    assert np.array_equal(ds.train_tokens, direct_tokens(ds, corpus.train))
    assert np.array_equal(ds.val_tokens, direct_tokens(ds, corpus.val))


def test_max_stories_caps_training_only(tmp_path):
    path = write_txt(tmp_path / "a.txt", STORIES[:100])
    ds = prepared.prepare_dataset(str(tmp_path / "ds"), [path], VOCAB, max_stories=30, **SMALL)
    assert ds.meta["train"]["n_stories"] == 30 and ds.meta["val"]["n_stories"] == 10


def test_generated_stories_are_opt_in_and_recorded(tmp_path):
    ds = prepared.prepare_dataset(str(tmp_path / "ds"), None, VOCAB, origin="generated", offline_stories=200, **SMALL)
    corpus = load_corpus(None, 0.1, None, 1, offline_stories=200, origin="generated", log=lambda _: None)
    assert np.array_equal(ds.train_tokens, direct_tokens(ds, corpus.train))
    assert ds.meta["source"] == {"origin": "generated", "stories": 200} and "NOT TinyStories" in ds.describe()


def fake_hub(monkeypatch, splits: dict) -> list:
    """datasets.load_dataset returns an in-memory DatasetDict (real Arrow datasets); the probe says reachable."""
    import datasets

    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()})

    monkeypatch.setattr(text_mod, "_probe_hub", lambda timeout: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_keeps_its_validation_split(tmp_path, monkeypatch, no_hub_switches):
    train, val = STORIES[:200] + ["  ", ""], STORIES[200:] + TRICKY
    calls = fake_hub(monkeypatch, {"train": train, "validation": val})
    ds = prepared.prepare_dataset(str(tmp_path / "ds"), None, VOCAB, max_stories=150, **SMALL)
    assert calls == [("roneneldan/TinyStories", {})]  # the cached download, not streamed
    assert ds.val_stories() == val and np.array_equal(ds.train_tokens, direct_tokens(ds, STORIES[:150]))
    source = ds.meta["source"]
    assert source["origin"] == "hub" and source["dataset"] == "roneneldan/TinyStories" and source["fingerprint"]
    assert ds.source_record() == {"origin": "prepared", "path": os.path.abspath(ds.path),
                                  "fingerprint": ds.fingerprint, "source": source}


def test_hub_without_validation_holds_out_by_seed(tmp_path, monkeypatch, no_hub_switches):
    fake_hub(monkeypatch, {"train": STORIES[:100]})
    ds = prepared.prepare_dataset(str(tmp_path / "ds"), None, VOCAB, **SMALL)
    train, val = text_mod.split_stories(STORIES[:100], 0.1, 1)
    assert ds.val_stories() == val and np.array_equal(ds.train_tokens, direct_tokens(ds, train))


def test_unreachable_hub_fails_in_seconds_without_loading(tmp_path, monkeypatch, no_hub_switches):
    import datasets

    monkeypatch.setattr(text_mod, "_probe_hub", lambda timeout: "https://huggingface.co unreachable: gaierror")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    with pytest.raises(DataError, match="hub is unreachable .* HF_DATASETS_OFFLINE=1 .* --data-files") as e:
        prepared.prepare_dataset(str(tmp_path / "ds"), None, VOCAB, **SMALL)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "ds") and not leftovers(tmp_path)


def test_offline_switch_reads_the_cache_only(tmp_path, monkeypatch):
    import datasets

    def not_cached(path, **kwargs):
        raise ConnectionError(f"Couldn't find cache for {path}")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(text_mod, "_probe_hub", lambda timeout: pytest.fail("probed the hub while offline"))
    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    with pytest.raises(DataError, match="not in the local cache .* Couldn't find cache for roneneldan/TinyStories"):
        prepared.prepare_dataset(str(tmp_path / "ds"), None, VOCAB, **SMALL)


# --------------------------------------------------------------------------------- workers and tokenizer

def test_one_and_two_workers_write_identical_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(prepared, "_CHUNK_STORIES", 16)  # several chunks, so two processes share the work
    path = write_txt(tmp_path / "a.txt", STORIES)
    one = prepared.prepare_dataset(str(tmp_path / "w1"), [path], VOCAB, **SMALL)
    two = prepared.prepare_dataset(str(tmp_path / "w2"), [path], VOCAB, **(SMALL | dict(workers=2)))
    assert two.meta["workers"] == 2 and one.meta["workers"] == 1
    for split in ("train", "val"):
        assert read(one.path, f"{split}.bin") == read(two.path, f"{split}.bin")
    assert one.fingerprint == two.fingerprint


def test_tokenizer_sample_is_seeded_and_about_the_size_asked():
    stories = STORIES * 5
    a, b = prepared.tokenizer_sample(stories, 30_000, 0), prepared.tokenizer_sample(stories, 30_000, 0)
    n = sum(len(s.encode()) for s in a)
    assert a == b and a != prepared.tokenizer_sample(stories, 30_000, 1)
    assert 30_000 <= n < 30_000 + max(len(s) for s in stories)
    assert prepared.tokenizer_sample(stories, 10**9, 0) == stories


def test_tokenizer_from_a_prepared_dataset(txt_dataset, tmp_path):
    ds, files = txt_dataset
    tok_dir = os.path.join(ds.path, "tokenizer")
    again = prepared.prepare_dataset(str(tmp_path / "ds"), files[:1], VOCAB, tokenizer_from=tok_dir, **SMALL)
    assert json.loads(read(tok_dir, "tokenizer.json")) == json.loads(read(again.path, "tokenizer", "tokenizer.json"))
    with pytest.raises(DataError, match=f"has {VOCAB} tokens but vocab_size=512; pass --vocab_size {VOCAB}"):
        prepared.prepare_dataset(str(tmp_path / "other"), files, 512, tokenizer_from=tok_dir, **SMALL)


# ----------------------------------------------------------------------------------------------- opening

def copy_dataset(ds, where) -> str:
    import shutil

    return shutil.copytree(ds.path, where)


@pytest.mark.parametrize("damage, message", [
    (lambda p: os.remove(os.path.join(p, "prepared.json")), "incomplete prepared dataset (no prepared.json"),
    (lambda p: os.truncate(os.path.join(p, "train.bin"), 100), "train.bin: 100 bytes, prepared.json says"),
    (lambda p: os.remove(os.path.join(p, "val.bin")), "val.bin: missing, prepared.json says"),
    (lambda p: os.remove(os.path.join(p, "tokenizer", "tokenizer.json")), "tokenizer/tokenizer.json is missing"),
    (lambda p: rewrite_meta(p, format=0), "prepared in format 0, this code reads format 1"),
    (lambda p: drop_meta_key(p, "train"), "prepared.json lacks train"),
    (lambda p: open(os.path.join(p, "prepared.json"), "w").write("{trunc"), "prepared.json: unreadable"),
])
def test_open_refuses_incomplete_or_other_format(txt_dataset, tmp_path, damage, message):
    path = copy_dataset(txt_dataset[0], str(tmp_path / "ds"))
    prepared.open_prepared(path)  # intact: opens
    damage(path)
    with pytest.raises(DataError) as e:
        prepared.open_prepared(path)
    assert message in str(e.value) and "prepare_data.py" in str(e.value) and "\n" not in str(e.value)


def rewrite_meta(path, **changes) -> None:
    meta_path = os.path.join(path, "prepared.json")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(meta_path, "w") as f:
        json.dump(meta | changes, f)


def drop_meta_key(path, key) -> None:
    meta_path = os.path.join(path, "prepared.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta[key]
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def test_open_missing(tmp_path):
    with pytest.raises(DataError, match=r"no prepared dataset there; prepare one: python prepare_data.py --out"):
        prepared.open_prepared(str(tmp_path / "nowhere"))


def test_describe_is_one_line(txt_dataset):
    ds = txt_dataset[0]
    line = ds.describe()
    assert "\n" not in line and "local files a.txt, b.txt" in line and ds.fingerprint[:12] in line
    assert f"{ds.meta['train']['n_tokens']:,}" in line and "vocab 300" in line


# ------------------------------------------------------------------------------------ again, and --force

def test_rerun_is_idempotent_and_fast(txt_dataset, tmp_path, monkeypatch):
    ds, files = txt_dataset
    moved = [write_txt(tmp_path / "a.txt", STORIES[:150] + TRICKY), write_txt(tmp_path / "b.txt", STORIES[150:])]
    monkeypatch.setattr(prepared, "_build", lambda *a, **k: pytest.fail("prepared again"))
    lines = []
    start = time.perf_counter()
    again = prepared.prepare_dataset(ds.path, moved, VOCAB, **(SMALL | dict(log=lines.append, workers=2)))
    assert time.perf_counter() - start < 2 and again.fingerprint == ds.fingerprint  # same text moved: same data
    assert len(lines) == 1 and "is already prepared" in lines[0]


def test_different_settings_need_force(tmp_path):
    path = write_txt(tmp_path / "a.txt", STORIES[:100])
    out = str(tmp_path / "ds")
    first = prepared.prepare_dataset(out, [path], VOCAB, **SMALL)
    with pytest.raises(DataError, match=r"prepared differently \(vocab_size: 300 \(now 320\)\); pass --force"):
        prepared.prepare_dataset(out, [path], 320, **SMALL)
    assert prepared.open_prepared(out).fingerprint == first.fingerprint and not leftovers(tmp_path)
    second = prepared.prepare_dataset(out, [path], 320, force=True, **SMALL)
    assert second.vocab_size == 320 and second.fingerprint != first.fingerprint and not leftovers(tmp_path)


def test_a_directory_that_is_not_a_dataset_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    path = write_txt(tmp_path / "a.txt", STORIES[:50])
    with pytest.raises(DataError, match="is not a prepared dataset .* never replaced, even with --force"):
        prepared.prepare_dataset(str(tmp_path / "mine"), [path], VOCAB, force=True, **SMALL)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_stale_temporaries_of_a_killed_preparation(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    out = tmp_path / "ds"
    (tmp_path / f"ds.tmp-{dead.pid}").mkdir()
    (tmp_path / f"ds.old-{dead.pid}").mkdir()
    (tmp_path / f"ds.old-{dead.pid}" / "prepared.json").write_text("{}")
    (tmp_path / f"ds.tmp-{os.getpid()}x").mkdir()  # not a pid: left alone
    lines = []
    prepared._remove_stale(str(out), lines.append)
    assert (out / "prepared.json").exists() and sorted(os.listdir(tmp_path)) == ["ds", f"ds.tmp-{os.getpid()}x"]
    assert len(lines) == 2


# ----------------------------------------------------------------------------------------- failed writes

class FailingFile:
    """A real file whose write() stores half the data, then raises ENOSPC: a disk filling up mid-write."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fail_writes_to(monkeypatch, name: str) -> None:
    real_open = open
    monkeypatch.setattr(prepared, "open", lambda path, mode="r", *a, **k: FailingFile(real_open(path, mode, *a, **k))
                        if "w" in mode and os.path.basename(path) == name else real_open(path, mode, *a, **k),
                        raising=False)


@pytest.mark.parametrize("name", ["train.bin", "val.bin", "prepared.json"])
def test_failed_write_leaves_no_partial_dataset(tmp_path, monkeypatch, name):
    path = write_txt(tmp_path / "a.txt", STORIES[:60])
    fail_writes_to(monkeypatch, name)
    with pytest.raises(WriteFailed) as e:
        prepared.prepare_dataset(str(tmp_path / "ds"), [path], VOCAB, **SMALL)
    assert "no space left on device" in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_failed_forced_write_keeps_the_old_dataset(tmp_path, monkeypatch):
    path = write_txt(tmp_path / "a.txt", STORIES[:60])
    old = prepared.prepare_dataset(str(tmp_path / "ds"), [path], VOCAB, **SMALL)
    fail_writes_to(monkeypatch, "prepared.json")
    assert prepare_data.main(["--data-files", path, "--out", str(tmp_path / "ds"), "--vocab_size", "320", "--force",
                              "--workers", "1", "--tokenizer-sample-mb", "0.02"]) == 1
    assert prepared.open_prepared(str(tmp_path / "ds")).fingerprint == old.fingerprint and not leftovers(tmp_path)


def test_not_enough_space_is_refused_before_the_token_files(tmp_path, monkeypatch, capsys):
    import common.files as disk

    path = write_txt(tmp_path / "a.txt", STORIES[:60])
    monkeypatch.setattr(disk, "free_bytes", lambda p: 1000)
    assert prepare_data.main(["--data-files", path, "--out", str(tmp_path / "ds"), "--workers", "1",
                              "--tokenizer-sample-mb", "0.02"]) == 2
    assert "not enough disk space" in capsys.readouterr().err and sorted(os.listdir(tmp_path)) == ["a.txt"]


# ------------------------------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("args, message", [
    (["--data-files", "nope.txt"], "nope.txt: no such file"),
    (["--generated", "--vocab_size", "100"], "vocab_size=100 must be in 257..65536"),
    (["--generated", "--val_fraction", "1.5", "--workers", "0"], "val_fraction=1.5 must be between 0 and 1"),
    (["--generated", "--data-files", "x.txt"], "data files and generated stories were both asked for"),
    (["--generated", "--out", "{tmp}/a.txt"], "is a file; choose a directory"),
    (["--generated", "--tokenizer-from", "{tmp}"], "no tokenizer.json there"),
])
def test_cli_bad_input_exits_2_before_any_work(tmp_path, capsys, args, message):
    (tmp_path / "a.txt").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "ds")]
    assert prepare_data.main(args + out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


@pytest.mark.slow
def test_cli_prepares_with_two_workers_then_says_already_prepared(tmp_path):
    """As a script (the spawned workers import it as their main module), then again: already prepared."""
    cmd = [sys.executable, "prepare_data.py", "--generated", "--offline_stories", "2400", "--vocab_size", "300",
           "--workers", "2", "--tokenizer-sample-mb", "0.05", "--out", str(tmp_path / "ds")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "with 2 worker(s)" in first.stdout
    assert f"python train_tinystories.py --dataset {tmp_path / 'ds'}" in first.stdout
    assert "bytes/token" in first.stdout and "Tokenizer: 300 tokens trained on" in first.stdout
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "is already prepared" in again.stdout and "Tokenizer:" not in again.stdout

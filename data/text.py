"""Stories for training: local files, the Hugging Face hub, or (offline) the project's generated stories.

    from data.text import load_corpus
    corpus = load_corpus(["TinyStories-train.txt"])       # or None: the hub, else generated stories
    print(corpus.source, len(corpus.train), len(corpus.val))

Local `.txt` files use the official TinyStories layout (stories separated by a line holding exactly
`<|endoftext|>`); `.json` / `.jsonl` files hold records with a `text` field. Every problem with a file is a
`DataError` whose one-line message names the file, the problem and the fix, raised before any other work.
"""
from __future__ import annotations

import codecs
import itertools
import os
import random
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from config import data_problems
from data.synthetic import generate_stories

EOT = "<|endoftext|>"
_SEPARATOR = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.MULTILINE)
_JSON_EXTS = (".json", ".jsonl")
_CHUNK_BYTES = 1 << 24  # read big files in 16 MiB pieces: the official train file is 1.9 GB
HUB_DEFAULT_STORIES = 200_000  # training stories streamed from the hub when max_stories is None
TRUE_WORDS = ("1", "true", "yes", "on")


class DataError(ValueError):
    """Bad data input; the message is one line naming the file, the problem and the fix."""


@dataclass
class Corpus:
    """Training and validation stories, and where they came from (one line for the user)."""

    train: list[str]
    val: list[str]
    source: str
    origin: str = "files"  # files | hub | generated: what a resumed run must read again


def load_corpus(data_files: list[str] | None, val_fraction: float = 0.05, max_stories: int | None = None,
                seed: int = 0, hub_dataset: str = "roneneldan/TinyStories", hub_timeout: float = 3.0,
                offline_stories: int = 20000, log: Callable[[str], None] = print, origin: str = "auto") -> Corpus:
    """Stories from data_files; with None, from the hub, falling back within seconds to generated stories.

    max_stories caps the training stories (None or 0 = all; the hub streams HUB_DEFAULT_STORIES). origin "hub" or
    "generated" (a resumed run's) takes that source only: no fallback from the hub, no hub probe for generated.
    """
    problems = data_problems(val_fraction, max_stories, offline_stories)
    if problems:
        raise DataError("load_corpus: " + "; ".join(problems))
    max_stories = max_stories or None  # 0 = all, as everywhere
    if data_files is not None:
        return _load_local(list(data_files), val_fraction, max_stories, seed)
    if origin == "generated":
        reason = "resuming a run that trained on them"
    else:
        reason = hub_unavailable_reason(hub_timeout)
        if reason is None:
            try:
                return _load_hub(hub_dataset, val_fraction, max_stories, seed)
            except Exception as e:  # any failure of a remote service: fall back rather than stop the run
                reason = f"loading {hub_dataset} failed: {one_line(e)}"
        if origin == "hub":
            raise DataError(f"this run trained on {hub_dataset} from the hub, which cannot be read now ({reason}); "
                            "resume where the hub is reachable")
    log(f"Hugging Face hub not used ({reason}); training on {offline_stories:,} generated template stories, "
        "NOT TinyStories: pass local data files (TinyStories .txt or .jsonl) for real text")
    train, val = split_stories(generate_stories(offline_stories, seed=seed), val_fraction, seed)
    return Corpus(_cap(train, max_stories), val,
                  f"generated template stories (NOT TinyStories: offline fallback, {offline_stories:,} stories)",
                  "generated")


def split_stories(stories: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): a deterministic shuffle by seed, then val_fraction of the stories (at least 1) held out."""
    if len(stories) < 2:
        raise DataError(f"only {len(stories)} story in the corpus: need at least 2 (one is held out for "
                        "validation); add stories")
    order = list(range(len(stories)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(stories) * val_fraction)), len(stories) - 1)
    return [stories[i] for i in order[n_val:]], [stories[i] for i in order[:n_val]]




def _cap(stories: list[str], max_stories: int | None) -> list[str]:
    return stories if max_stories is None else stories[:max_stories]


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# ---------------------------------------------------------------- local files

def check_files(paths: list[str]) -> None:
    """Raise DataError for the first missing, unreadable, empty or unsupported file: cheap, before any work."""
    if not paths:
        raise DataError("no data files given: pass at least one .txt, .json or .jsonl file (or none for the hub)")
    for path in paths:
        _check_file(path)


def _load_local(paths: list[str], val_fraction: float, max_stories: int | None, seed: int) -> Corpus:
    """Check every file, then parse them all, then split."""
    check_files(paths)
    per_file = [(path, read_stories_file(path)) for path in paths]
    stories = [s for _, file_stories in per_file for s in file_stories]
    train, val = split_stories(stories, val_fraction, seed)
    listing = ", ".join(f"{os.path.basename(p)} ({len(s):,} stories)" for p, s in per_file)
    return Corpus(_cap(train, max_stories), val, f"local files: {listing}")


def _check_file(path: str) -> None:
    """Raise DataError for a missing, unreadable, empty or unsupported file, before any parsing."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file; check the path (relative paths start at {os.getcwd()})")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a file; pass the story files inside it")
    if ext not in (".txt",) + _JSON_EXTS:
        raise DataError(f"{path}: unsupported extension {ext or '(none)'!r}; use .txt (TinyStories layout, stories "
                        f"separated by {EOT} lines) or .json/.jsonl (records with a 'text' field)")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); fix its permissions (chmod +r)") from None
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file; pass a file that holds stories")


def read_stories_file(path: str) -> list[str]:
    """Stories of one checked file."""
    if path.lower().endswith(".txt"):
        return _read_txt(path)
    for _ in _decoded_chunks(path):  # datasets' own error for non-UTF-8 bytes names no offset
        pass
    return _read_json(path)


def _decoded_chunks(path: str) -> Iterator[str]:
    """The file's text in pieces that end at line ends; DataError naming the byte offset of bad UTF-8."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK_BYTES) + f.readline()  # readline: never cut a line or a character
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character held from before
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text: undecodable byte at offset {offset - pending + e.start:,}; "
                                "convert it (e.g. iconv -f latin1 -t utf-8) or remove the bad bytes") from None
            if not chunk:
                return
            offset += len(chunk)
            yield text


def _read_txt(path: str) -> list[str]:
    """Stories of a TinyStories-layout text file: blocks between lines holding exactly <|endoftext|>."""
    stories, tail, separated = [], "", False
    for i, text in enumerate(_decoded_chunks(path)):
        text = text.replace("\r\n", "\n")
        parts = _SEPARATOR.split(tail + (text.lstrip("\ufeff") if i == 0 else text))
        separated |= len(parts) > 1
        tail = parts.pop()  # the story still open at the end of this piece
        stories += [p.strip() for p in parts if p.strip()]
    if not separated:
        raise DataError(f"{path}: no line holding exactly {EOT}, so it would be one single story; use the "
                        f"TinyStories layout (a {EOT} line after each story) or .jsonl with a 'text' field")
    if tail.strip():
        stories.append(tail.strip())
    return stories


def _read_json(path: str) -> list[str]:
    """Stories from the `text` field of a .json (array or lines) or .jsonl file, via `datasets`."""
    import datasets  # heavy import, only needed here

    try:
        ds = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as e:
        raise DataError(f"{path}: not readable as JSON records ({one_line(e)}); write one JSON object per "
                        "line, each with a 'text' field") from None
    if "text" not in ds.column_names:
        raise DataError(f"{path}: records have no 'text' field (fields: {', '.join(ds.column_names) or 'none'}); "
                        "rename the story field to 'text'")
    return clean_texts(ds["text"])


def clean_texts(texts: Iterable) -> list[str]:
    """Stripped, non-empty strings."""
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


# ---------------------------------------------------------------- the Hugging Face hub

def offline_switch() -> str | None:
    """The Hugging Face offline switch that is set ("HF_HUB_OFFLINE=1"), or None."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in TRUE_WORDS:
            return f"{name}={os.environ[name]}"
    return None


def hub_unavailable_reason(timeout: float) -> str | None:
    """None if the hub may be used; else why not (offline switch set, or no answer within timeout)."""
    switch = offline_switch()
    return f"{switch} is set" if switch else _probe_hub(timeout)


def _probe_hub(timeout: float) -> str | None:
    """None if the hub answers an HTTPS request within timeout seconds, else the reason it did not."""
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    result: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:  # the server answered: it is reachable
            result.append(None)
        except Exception as e:
            result.append(f"{url} unreachable: {one_line(getattr(e, 'reason', e))}")

    # a thread, because urlopen's timeout does not cover the DNS lookup, which can hang far longer
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer from {url} within {timeout:g} s"


def _load_hub(hub_dataset: str, val_fraction: float, max_stories: int | None, seed: int) -> Corpus:
    """Stream max_stories (default HUB_DEFAULT_STORIES) training stories and the validation split, if any."""
    # streaming: a small run must not download the whole 2 GB dataset first
    train, val, _ = hub_stories(hub_dataset, val_fraction, seed, max_stories or HUB_DEFAULT_STORIES, streaming=True)
    name = hub_dataset.rsplit("/", 1)[-1]
    return Corpus(train, val, f"{name} from the Hugging Face hub ({hub_dataset}; {len(train):,} training, "
                              f"{len(val):,} validation stories)", "hub")


def hub_stories(name: str, val_fraction: float, seed: int, max_stories: int | None, *, streaming: bool
                ) -> tuple[list[str], list[str], object]:
    """(train, val, the train split) from a hub dataset's 'text' field; val is its validation split, else held out
    of train. streaming reads only the first max_stories (a run's corpus); otherwise the whole dataset comes
    through the local cache (a prepared dataset; HF_DATASETS_OFFLINE=1 then reads that cache)."""
    import datasets  # heavy import, only needed here

    splits = datasets.load_dataset(name, **({"streaming": True} if streaming else {}))
    if "train" not in splits:
        raise DataError(f"{name}: no 'train' split (splits: {', '.join(splits)}); use a dataset of stories in a "
                        "'text' field")
    read = _streamed_texts if streaming else _arrow_texts
    train = read(splits["train"], max_stories)
    if not train:
        raise DataError(f"{name}: no stories in a 'text' field of its train split; use a dataset of stories")
    if "validation" in splits:
        val = read(splits["validation"], None)
    else:
        train, val = split_stories(train, val_fraction, seed)
    if not val:
        raise DataError(f"{name}: no stories in a 'text' field of its validation split; use a dataset of stories")
    return train, val, splits["train"]


def _streamed_texts(split, limit: int | None) -> list[str]:
    """Stripped non-empty texts of the first limit records of a streamed split (all for None)."""
    return clean_texts(r.get("text") for r in itertools.islice(split, limit))


def _arrow_texts(split, limit: int | None) -> list[str]:
    """The same for a downloaded split, through Arrow: iterating a datasets column row by row is ~40x slower
    (13 s per 200k stories, measured)."""
    if "text" not in split.column_names:
        return []
    rows = split.with_format("arrow")[: len(split) if limit is None else min(limit, len(split))]
    return clean_texts(rows["text"].to_pylist())

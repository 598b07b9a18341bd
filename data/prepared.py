"""A dataset prepared once (tokenizer + uint16 token files) that every run then only memory-maps.

    from data.prepared import prepare_dataset, open_prepared
    ds = prepare_dataset("data/tinystories-4096", None, 4096)   # TinyStories from the hub; minutes, once
    ds = open_prepared("data/tinystories-4096")                   # milliseconds, whatever the corpus size
    ds.train_tokens, ds.val_tokens, ds.tokenizer, ds.fingerprint

A prepared directory holds tokenizer/ (save_tokenizer's layout), train.bin and val.bin (uint16 ids, each story
followed by eos, as data/tokens.py caches them) and prepared.json, written last: without it the directory is
incomplete. It is built in a sibling temporary directory and renamed into place, so a killed or failed
preparation never leaves a half-written dataset where a run would read it.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import re
import shlex
import shutil
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

import data.text as text
from common.files import check_free_space, existing_ancestor, guarded_write, sha256_file
from common.formats import human
from common.processes import process_alive
from config import data_problems
from data.source import describe_files
from data.text import DataError, check_files, load_corpus

FORMAT = 1  # bump when the layout changes: open_prepared refuses other versions
META_FILE = "prepared.json"
SPLITS = ("train", "val")
HUB_DATASET = "roneneldan/TinyStories"
# 100 MB (~5% of TinyStories): on real text, held-out tokens per byte still improves 0.24% from 1.6 to 3.3 MB of
# training text, the largest size measurable here; 100 MB trains in 23 s on 2 cores (30 MB: 12 s), a fifth of
# preparing the full 1.9 GB on 16 cores (~2 min): cheap insurance (bench/results/tokenize_rate.json)
TOKENIZER_SAMPLE_BYTES = 100_000_000
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_CHUNK_STORIES = 1024  # stories per worker task: ~1 MB of TinyStories text, ~0.5 s of one core
_PROGRESS_SECONDS = 10.0
_ORIGINS = ("auto", "files", "hub", "generated")


@dataclass
class PreparedDataset:
    """An opened prepared directory: its record (meta) and read-only memory maps of its token files."""

    path: str
    meta: dict
    train_tokens: np.memmap
    val_tokens: np.memmap
    _tokenizer: object = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def tokenizer(self) -> "transformers.PreTrainedTokenizerFast":
        """The dataset's tokenizer, loaded on first use (importing transformers takes seconds)."""
        if self._tokenizer is None:
            from data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(os.path.join(self.path, "tokenizer"))
        return self._tokenizer

    def val_stories(self) -> list[str]:
        """The validation stories, decoded from val.bin (byte-level BPE gives back the exact text)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(self.path, "tokenizer", "tokenizer.json"))
        ids = np.asarray(self.val_tokens)
        ends = np.flatnonzero(ids == self.meta["eos_id"])
        starts = np.concatenate(([0], ends[:-1] + 1))
        return tok.decode_batch([ids[a:b].tolist() for a, b in zip(starts, ends)], skip_special_tokens=False)

    def describe(self) -> str:
        """One line for the run log."""
        t, v = self.meta["train"], self.meta["val"]
        return (f"prepared dataset {self.path} ({describe_source(self.meta['source'])}; {t['n_stories']:,} training / "
                f"{v['n_stories']:,} validation stories, {t['n_tokens']:,} / {v['n_tokens']:,} tokens, vocab "
                f"{self.vocab_size:,}, fingerprint {self.fingerprint[:12]})")

    def source_record(self) -> dict:
        """What a run records as its data source: this directory, its fingerprint and where its text came from."""
        return {"origin": "prepared", "path": os.path.abspath(self.path), "fingerprint": self.fingerprint,
                "source": self.meta["source"]}


def describe_source(record: dict) -> str:
    """A source record in a few words."""
    if record["origin"] == "files":
        names = ", ".join(os.path.basename(f["path"]) for f in record["files"])
        return f"local file{'s' if len(record['files']) > 1 else ''} {names}"
    if record["origin"] == "hub":
        rev = record.get("revision")
        return f"{record['dataset']} from the Hugging Face hub" + (f", revision {rev[:12]}" if rev else "")
    return f"{record.get('stories', 0):,} generated template stories (NOT TinyStories)"


# ------------------------------------------------------------------------------------------------ open

def open_prepared(path: str) -> PreparedDataset:
    """The prepared dataset at path, memory-mapped (no token is read yet); DataError (one line) if it is missing,
    incomplete, damaged (a token file of the wrong size) or of another format version."""
    meta = _read_meta(path)
    again = f"prepare it again: {meta.get('command', f'python prepare_data.py --out {path}')} --force"
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: prepared in format {meta.get('format')}, this code reads format {FORMAT}; {again}")
    missing = [k for k in ("fingerprint", "vocab_size", "eos_id", "source", *SPLITS) if k not in meta]
    if missing:
        raise DataError(f"{path}: {META_FILE} lacks {', '.join(missing)}; {again}")
    if not os.path.isfile(os.path.join(path, "tokenizer", "tokenizer.json")):
        raise DataError(f"{path}: tokenizer/tokenizer.json is missing; {again}")
    tokens = {}
    for split in SPLITS:
        bin_path, want = os.path.join(path, f"{split}.bin"), 2 * meta[split].get("n_tokens", -1)
        have = os.path.getsize(bin_path) if os.path.isfile(bin_path) else None
        if have != want:
            found = "missing" if have is None else f"{have:,} bytes"
            raise DataError(f"{bin_path}: {found}, prepared.json says {want:,} bytes (truncated or replaced); {again}")
        tokens[split] = np.memmap(bin_path, dtype=np.uint16, mode="r")
    return PreparedDataset(path, meta, tokens["train"], tokens["val"])


def resume_prepared(recorded: dict, dataset: str | None) -> str:
    """The prepared dataset directory that continues the run: the recorded one, or `dataset` if it was moved;
    DataError (one line) if it is gone or holds other tokens than the run trained on."""
    path = dataset or recorded["path"]
    if not dataset and not os.path.exists(path):
        raise DataError(f"the run's prepared dataset {path} is gone; pass it from where it is now with --dataset "
                        f"(checked by its fingerprint {recorded['fingerprint'][:12]}...)")
    found = open_prepared(path).fingerprint
    if found != recorded["fingerprint"]:
        raise DataError(f"{path} is not the prepared dataset this run trained on (fingerprint {found[:12]}..., the "
                        f"run's {recorded['fingerprint'][:12]}...): resume with the same dataset, or start a new run")
    return path


def _read_meta(path: str) -> dict:
    if not os.path.isdir(path):
        raise DataError(f"{path}: no prepared dataset there; prepare one: python prepare_data.py --out {path} "
                        "(see --help)")
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise DataError(f"{path}: incomplete prepared dataset (no {META_FILE}: its preparation did not finish); "
                        f"prepare it again: python prepare_data.py --out {path} --force (see --help)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: unreadable ({text.one_line(e)}); prepare it again: python prepare_data.py "
                        f"--out {path} --force (see --help)") from None
    return meta


# --------------------------------------------------------------------------------------------- prepare

def prepare_dataset(out_dir: str, data_files: list[str] | None, vocab_size: int, *, origin: str = "auto",
                    val_fraction: float = 0.05, seed: int = 0, max_stories: int | None = None,
                    offline_stories: int = 20000, workers: int = CPUS,
                    tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES, tokenizer_from: str | None = None,
                    force: bool = False, hub_dataset: str = HUB_DATASET, hub_timeout: float = 3.0,
                    log: Callable[[str], None] = print) -> PreparedDataset:
    """Read the stories, train (or reuse) the tokenizer, tokenize both splits into out_dir; return it opened.

    origin: "auto" (data_files if given, else the hub; never generated stories unasked), "files", "hub" or
    "generated". An identical dataset already in out_dir is returned at once; a different one is replaced only
    with force. Bad input is DataError before any work; a failed write is WriteFailed, leaving out_dir as it was.
    """
    origin = _resolve_origin(origin, data_files)
    max_stories = max_stories or None
    _check_args(out_dir, data_files, origin, vocab_size, val_fraction, max_stories, offline_stories, workers,
                tokenizer_sample_bytes, tokenizer_from)
    files_record = describe_files(data_files) if origin == "files" else None  # hashed once: request and record
    request = _request(origin, files_record, hub_dataset, offline_stories, vocab_size, seed, val_fraction,
                       max_stories, tokenizer_sample_bytes, tokenizer_from)
    _remove_stale(out_dir, log)
    ready = _existing(out_dir, request, force)
    if ready is not None:
        log(f"{out_dir} is already prepared from the same data and settings (fingerprint {ready.fingerprint[:12]}); "
            "nothing to do (--force prepares it again)")
        return ready
    command = _command(out_dir, data_files, origin, vocab_size, seed, val_fraction, max_stories, offline_stories,
                       tokenizer_sample_bytes, tokenizer_from)
    log(f"Preparing {out_dir}: " + _plan(origin, data_files, hub_dataset, offline_stories, vocab_size, val_fraction,
                                         seed, tokenizer_sample_bytes, tokenizer_from, workers))
    started = time.perf_counter()
    train, val, source = _read_stories(origin, data_files, files_record, hub_dataset, hub_timeout, val_fraction,
                                       seed, max_stories, offline_stories, log)
    meta = dict(format=FORMAT, request=request, source=source, vocab_size=vocab_size, seed=seed,
                val_fraction=val_fraction, max_stories=max_stories, dtype="uint16", command=command,
                seconds={"read": round(time.perf_counter() - started, 1)})
    _build(out_dir, train, val, meta, tokenizer_sample_bytes, tokenizer_from, workers, log)
    return open_prepared(out_dir)


def _resolve_origin(origin: str, data_files: list[str] | None) -> str:
    if origin not in _ORIGINS:
        raise DataError(f"origin={origin!r} is not one of {', '.join(_ORIGINS)}; pick one")
    if origin == "auto":
        return "files" if data_files else "hub"
    return origin


def _check_args(out_dir: str, data_files: list[str] | None, origin: str, vocab_size: int, val_fraction: float,
                max_stories: int | None, offline_stories: int, workers: int, sample_bytes: int,
                tokenizer_from: str | None) -> None:
    """DataError naming every bad argument (value vs limit, and the fix), before any work."""
    from data.tokenizer import vocab_size_problem  # tokenizers loads only when a dataset is prepared

    problems = [p for p in [vocab_size_problem(vocab_size)] if p]
    problems += data_problems(val_fraction, max_stories, offline_stories)
    if workers < 1:
        problems.append(f"workers={workers} must be >= 1")
    if sample_bytes < 1:
        problems.append(f"tokenizer_sample_bytes={sample_bytes} must be >= 1")
    if origin == "generated" and data_files:
        problems.append("data files and generated stories were both asked for; pass one source")
    if origin == "files" and not data_files:
        problems.append("origin='files' but no data files given; pass --data-files")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        problems.append(f"--out {out_dir} is a file; choose a directory")
    elif not os.access(parent := existing_ancestor(os.path.dirname(os.path.abspath(out_dir))), os.W_OK | os.X_OK):
        problems.append(f"--out {out_dir}: {parent} is not writable (the dataset is built beside it); choose a "
                        "writable directory")
    if problems:
        raise DataError("prepare_dataset: " + "; ".join(problems))
    if origin == "files":
        check_files(data_files)
    if tokenizer_from is not None:
        _check_tokenizer_dir(tokenizer_from, vocab_size)


def _check_tokenizer_dir(directory: str, vocab_size: int) -> None:
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"--tokenizer-from {directory}: no tokenizer.json there; pass a directory saved by "
                        "save_tokenizer (e.g. a prepared dataset's tokenizer/)")
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(path).get_vocab_size()
    if n != vocab_size:
        raise DataError(f"--tokenizer-from {directory}: its vocabulary has {n:,} tokens but vocab_size={vocab_size:,}; "
                        f"pass --vocab_size {n}")


def _request(origin: str, files_record: list[dict] | None, hub_dataset: str, offline_stories: int, vocab_size: int,
             seed: int, val_fraction: float, max_stories: int | None, sample_bytes: int,
             tokenizer_from: str | None) -> dict:
    """What determines the prepared content: compared with an existing dataset's to tell 'already prepared'."""
    if origin == "files":  # contents, not paths: the same text moved elsewhere prepares the same dataset
        source = {"origin": "files", "files": [{"bytes": f["bytes"], "sha256": f["sha256"]} for f in files_record]}
    elif origin == "hub":  # its revision is known only once loaded: a re-run does not contact the hub
        source = {"origin": "hub", "dataset": hub_dataset}
    else:
        source = {"origin": "generated", "stories": offline_stories}
    tokenizer = ({"from_sha256": sha256_file(os.path.join(tokenizer_from, "tokenizer.json"))} if tokenizer_from
                 else {"sample_bytes": sample_bytes})
    return dict(source=source, vocab_size=vocab_size, seed=seed, val_fraction=val_fraction, max_stories=max_stories,
                tokenizer=tokenizer)


def _existing(out_dir: str, request: dict, force: bool) -> PreparedDataset | None:
    """The dataset in out_dir if it is complete and prepared as requested; None if out_dir may be (re)written;
    DataError if it holds something else and force does not allow replacing it."""
    if not os.path.exists(out_dir):
        return None
    if not os.path.exists(os.path.join(out_dir, META_FILE)):
        if not os.listdir(out_dir):
            return None
        raise DataError(f"{out_dir} exists and is not a prepared dataset (no {META_FILE}); it is never replaced, "
                        "even with --force: remove it yourself or choose another --out")
    if force:
        return None
    try:
        ready = open_prepared(out_dir)
    except DataError as e:
        raise DataError(f"{out_dir} holds a damaged prepared dataset ({e}); pass --force to prepare it again, or "
                        "choose another --out") from None
    old = ready.meta.get("request", {})
    differ = [f"{k}: {_short(old.get(k))} (now {_short(v)})" for k, v in request.items() if old.get(k) != v]
    if differ:
        raise DataError(f"{out_dir} already holds a dataset prepared differently ({'; '.join(differ)}); pass --force "
                        "to replace it (the old one stays until the new one is complete), or choose another --out")
    return ready


def _short(value) -> str:
    if isinstance(value, dict) and "files" in value:
        return "files " + ", ".join(f"{f['bytes']:,} bytes sha256 {f['sha256'][:12]}" for f in value["files"])
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _command(out_dir: str, data_files: list[str] | None, origin: str, vocab_size: int, seed: int,
             val_fraction: float, max_stories: int | None, offline_stories: int, sample_bytes: int,
             tokenizer_from: str | None) -> str:
    """The prepare_data.py command line that prepares this dataset (quoted in error messages that need it)."""
    args = ["python", "prepare_data.py", "--out", out_dir]
    if origin == "files":
        args += ["--data-files", *data_files]
    elif origin == "generated":
        args += ["--generated", "--offline_stories", str(offline_stories)]
    args += ["--vocab_size", str(vocab_size), "--seed", str(seed), "--val_fraction", str(val_fraction)]
    if max_stories:
        args += ["--max_stories", str(max_stories)]
    if tokenizer_from:
        args += ["--tokenizer-from", tokenizer_from]
    elif sample_bytes != TOKENIZER_SAMPLE_BYTES:
        args += ["--tokenizer-sample-mb", f"{sample_bytes / 1e6:g}"]
    return shlex.join(args)


def _plan(origin: str, data_files: list[str] | None, hub_dataset: str, offline_stories: int, vocab_size: int,
          val_fraction: float, seed: int, sample_bytes: int, tokenizer_from: str | None, workers: int) -> str:
    if origin == "files":
        source = f"{len(data_files)} file(s), {human(sum(os.path.getsize(p) for p in data_files))}"
        val = f"{val_fraction:g} of the stories held out for validation (seed {seed})"
    elif origin == "hub":
        source, val = f"{hub_dataset} from the Hugging Face hub (its cached download)", "its validation split"
    else:
        source = f"{offline_stories:,} generated template stories (NOT TinyStories)"
        val = f"{val_fraction:g} held out (seed {seed})"
    tok = f"tokenizer from {tokenizer_from}" if tokenizer_from else f"tokenizer trained on ~{sample_bytes / 1e6:g} MB"
    return f"{source}; {val}; vocab {vocab_size:,}, {tok}; {workers} worker(s)"


def _remove_stale(out_dir: str, log: Callable[[str], None]) -> None:
    """Delete what a killed preparation of out_dir left beside it; put back a dataset it had set aside."""
    base = os.path.abspath(out_dir)
    for path in glob.glob(glob.escape(base) + ".tmp-*") + glob.glob(glob.escape(base) + ".old-*"):
        pid = path.rsplit("-", 1)[-1]
        if not pid.isdigit() or process_alive(int(pid)):
            continue  # a live preparation's: leave it alone
        if path.startswith(base + ".old-") and not os.path.exists(base):
            os.replace(path, base)
            log(f"note: restored {out_dir}, set aside by a preparation that was killed before it finished")
        else:
            shutil.rmtree(path, ignore_errors=True)
            log(f"note: removed {path}, left by a preparation that was killed")


# ----------------------------------------------------------------------------------------- the stories

def _read_stories(origin: str, data_files: list[str] | None, files_record: list[dict] | None, hub_dataset: str,
                  hub_timeout: float, val_fraction: float, seed: int, max_stories: int | None, offline_stories: int,
                  log: Callable[[str], None]) -> tuple[list[str], list[str], dict]:
    """(train, val, source record) for the origin; files and generated stories are read as a run reads them."""
    started = time.perf_counter()
    if origin == "hub":
        train, val, source = _hub_stories(hub_dataset, hub_timeout, val_fraction, seed, max_stories)
    else:
        corpus = load_corpus(data_files if origin == "files" else None, val_fraction, max_stories, seed,
                             offline_stories=offline_stories, log=lambda _: None, origin=origin)
        train, val = corpus.train, corpus.val
        source = ({"origin": "files", "files": files_record} if origin == "files"
                  else {"origin": "generated", "stories": offline_stories})
    log(f"Read {len(train):,} training / {len(val):,} validation stories in {time.perf_counter() - started:.1f} s")
    return train, val, source


def _hub_stories(name: str, timeout: float, val_fraction: float, seed: int, max_stories: int | None
                 ) -> tuple[list[str], list[str], dict]:
    """The whole dataset through its cached download (not streamed: a second preparation reads the cache)."""
    offline = text.offline_switch() is not None  # then load_dataset reads the local cache only
    reason = None if offline else text.hub_unavailable_reason(timeout)
    if reason is not None:  # fail in seconds: an unreachable hub can hang load_dataset for minutes
        raise DataError(f"cannot read {name}: the Hugging Face hub is unreachable ({reason}); set "
                        "HF_DATASETS_OFFLINE=1 to use a download already cached here, pass --data-files, or "
                        "--generated for offline stories")
    try:
        train, val, train_ds = text.hub_stories(name, val_fraction, seed, max_stories, streaming=False)
    except DataError:
        raise
    except Exception as e:  # a remote service and its cache fail in many ways: one line, never a traceback
        where = "not in the local cache (offline)" if offline else "loading failed"
        raise DataError(f"cannot read {name}: {where}: {text.one_line(e)}; prepare where the hub is reachable, "
                        "or pass --data-files") from None
    record = {"origin": "hub", "dataset": name, "revision": _hub_revision(train_ds),
              "fingerprint": getattr(train_ds, "_fingerprint", None)}
    return train, val, record


def _hub_revision(ds) -> str | None:
    """The hub commit of the cached files: datasets names their directory after it."""
    files = getattr(ds, "cache_files", None) or []
    rev = os.path.basename(os.path.dirname(files[0]["filename"])) if files else ""
    return rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None


# ----------------------------------------------------------------------------------- build in a temporary

def _build(out_dir: str, train: list[str], val: list[str], meta: dict, sample_bytes: int,
           tokenizer_from: str | None, workers: int, log: Callable[[str], None]) -> None:
    """Tokenizer, token files and prepared.json (last) in a temporary sibling, renamed to out_dir at the end."""
    out = os.path.abspath(out_dir)
    tmp, old = f"{out}.tmp-{os.getpid()}", f"{out}.old-{os.getpid()}"
    with guarded_write(out) as write:
        os.makedirs(write.temporary(tmp))
        tok = _tokenizer(train, meta, sample_bytes, tokenizer_from, log)
        from data.tokenizer import save_tokenizer

        save_tokenizer(tok, os.path.join(tmp, "tokenizer"))
        meta["eos_id"] = eos = tok.eos_token_id
        write.needed = _check_space(out, tok, train, val)
        started = time.perf_counter()
        workers = max(1, min(workers, -(-len(train) // _CHUNK_STORIES)))  # no idle processes for small corpora
        with _encoder(os.path.join(tmp, "tokenizer", "tokenizer.json"), eos, workers) as encode:
            for split, stories in (("train", train), ("val", val)):
                meta[split] = write_split(stories, encode, os.path.join(tmp, f"{split}.bin"), split, log)
        meta["seconds"]["tokenize"] = round(time.perf_counter() - started, 1)
        meta["workers"] = workers
        meta["fingerprint"] = _fingerprint(tmp, meta)
        with open(os.path.join(tmp, META_FILE), "w") as f:  # last: its presence marks a complete dataset
            json.dump(meta, f, indent=2)
        if os.path.exists(out):  # force, or an empty directory: a directory cannot be renamed over a full one
            os.replace(out, old)
            write.on_failure(lambda: None if os.path.exists(out) else os.replace(old, out))
        os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    log(f"Wrote {out_dir} ({human(sum(2 * meta[s]['n_tokens'] for s in SPLITS))} of tokens)")


def _tokenizer(train: list[str], meta: dict, sample_bytes: int, tokenizer_from: str | None,
               log: Callable[[str], None]):
    """The tokenizer from tokenizer_from, or trained on a seeded sample of ~sample_bytes of training text."""
    from data.tokenizer import load_tokenizer, train_tokenizer

    if tokenizer_from:
        meta["tokenizer"] = {"from": os.path.abspath(tokenizer_from)}
        return load_tokenizer(tokenizer_from)
    started = time.perf_counter()
    sample = tokenizer_sample(train, sample_bytes, meta["seed"])
    n_bytes = sum(len(s.encode()) for s in sample)
    tok = train_tokenizer(sample, meta["vocab_size"])
    seconds = time.perf_counter() - started
    meta["tokenizer"] = {"sample_bytes": sample_bytes, "trained_on_stories": len(sample), "trained_on_bytes": n_bytes}
    meta["seconds"]["tokenizer"] = round(seconds, 1)
    log(f"Tokenizer: {meta['vocab_size']:,} tokens trained on {len(sample):,} stories ({n_bytes / 1e6:.1f} MB) "
        f"in {seconds:.1f} s")
    return tok


def tokenizer_sample(stories: list[str], sample_bytes: int, seed: int) -> list[str]:
    """A seeded random subset of stories holding about sample_bytes of UTF-8 text (all if they hold less), in
    their original order."""
    if sum(map(len, stories)) <= sample_bytes:  # characters <= bytes: cheap, and exact for ASCII
        return stories
    order = list(range(len(stories)))
    random.Random(seed).shuffle(order)
    picked, n = [], 0
    for i in order:
        if n >= sample_bytes:
            break
        picked.append(i)
        n += len(stories[i].encode())
    return [stories[i] for i in sorted(picked)]


def _check_space(out: str, tok, train: list[str], val: list[str]) -> int:
    """Bytes the token files will take (2 per token; tokens per character measured on a few stories);
    NotEnoughSpace if they do not fit beside out."""
    picked = train[:: max(1, len(train) // 500)]
    n_tok = sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(picked, add_special_tokens=False))
    per_char = n_tok / max(1, sum(map(len, picked)))
    needed = sum(2 * (round(per_char * sum(map(len, s))) + len(s)) for s in (train, val))
    check_free_space(os.path.dirname(out), {"token files": needed}, fix="free space or choose another --out")
    return needed


def _fingerprint(tmp: str, meta: dict) -> str:
    """SHA-256 over the tokenizer and both token files' hashes: the exact prepared content, checked cheaply."""
    h = hashlib.sha256(f"prepared format {FORMAT}\n".encode())
    h.update(sha256_file(os.path.join(tmp, "tokenizer", "tokenizer.json")).encode())
    for split in SPLITS:
        h.update(f"{split} {meta[split]['sha256']}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------- parallel tokenizing

_WORKER: tuple | None = None  # (tokenizer, eos id) in a worker process


def encode_chunk(tok, eos: int, stories: list[str]) -> tuple[bytes, int, int]:
    """(uint16 ids of the stories, each followed by eos, as bytes; number of stories; bytes of UTF-8 text)."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (tokenizers >= 0.21): no offsets
    ids = [e.ids for e in encode(stories, add_special_tokens=False)]
    n = sum(map(len, ids)) + len(ids)
    flat = np.fromiter(itertools.chain.from_iterable(x + [eos] for x in ids), dtype=np.uint16, count=n)
    return flat.tobytes(), len(stories), sum(len(s.encode()) for s in stories)


def _init_worker(tokenizer_file: str, eos: int) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    from tokenizers import Tokenizer

    _WORKER = (Tokenizer.from_file(tokenizer_file), eos)


def _worker_encode(stories: list[str]) -> tuple[bytes, int, int]:
    return encode_chunk(*_WORKER, stories)


@contextmanager
def _encoder(tokenizer_file: str, eos: int, workers: int
             ) -> Iterator[Callable[[Iterable[list[str]]], Iterator[tuple[bytes, int, int]]]]:
    """A function mapping chunks of stories to their encode_chunk results, in order: in this process for one
    worker, else in a pool of worker processes (spawned: a fork would copy the caller's threads and torch).

    Processes rather than the tokenizers library's own threads: as fast on 2 cores (3.45 vs 3.33 MB/s), but with
    threads the ids -> uint16 conversion (~4.5% of one core's time) stays serial, capping 16 cores at ~9.5x."""
    if workers == 1:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer_file)
        with _single_threaded_tokenizers():
            yield lambda chunks: (encode_chunk(tok, eos, c) for c in chunks)
        return
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker, (tokenizer_file, eos))
    try:  # an executor, not a Pool: a killed worker raises BrokenProcessPool instead of hanging forever
        yield lambda chunks: _in_order(pool, chunks, window=2 * workers)
    finally:
        pool.shutdown(cancel_futures=True)


@contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false while inside (read at every batch call): one worker means one core."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _in_order(pool, chunks: Iterable[list[str]], window: int) -> Iterator[tuple[bytes, int, int]]:
    """Results in submission order, at most window chunks in flight: memory stays bounded."""
    pending = deque()
    for chunk in chunks:
        pending.append(pool.submit(_worker_encode, chunk))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_split(stories: list[str], encode, path: str, name: str, log: Callable[[str], None]) -> dict:
    """Tokenize stories chunk by chunk into path; its n_stories, n_tokens, n_bytes (UTF-8 text) and sha256."""
    h, n_tokens, n_bytes, done = hashlib.sha256(), 0, 0, 0
    started = last = time.perf_counter()
    chunks = (stories[i:i + _CHUNK_STORIES] for i in range(0, len(stories), _CHUNK_STORIES))
    with open(path, "wb") as f:
        for data, n_stories, chunk_bytes in encode(chunks):
            f.write(data)
            h.update(data)
            n_tokens, n_bytes, done = n_tokens + len(data) // 2, n_bytes + chunk_bytes, done + n_stories
            now = time.perf_counter()
            if now - last >= _PROGRESS_SECONDS and done < len(stories):
                last, rate = now, n_bytes / 1e6 / (now - started)
                left = (now - started) * (len(stories) - done) / done
                log(f"  {name}: {done:,} / {len(stories):,} stories ({done / len(stories):.0%}), {n_bytes / 1e6:,.0f} "
                    f"MB, {rate:.2f} MB/s, ~{left:.0f} s left")
    seconds = time.perf_counter() - started
    log(f"  {name}: {len(stories):,} stories, {n_bytes / 1e6:,.1f} MB -> {n_tokens:,} tokens in {seconds:.1f} s "
        f"({n_bytes / 1e6 / max(seconds, 1e-9):.2f} MB/s)")
    return dict(n_stories=len(stories), n_tokens=n_tokens, n_bytes=n_bytes, sha256=h.hexdigest(),
                seconds=round(seconds, 2))

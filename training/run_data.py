"""A run's data: the corpus or a prepared dataset, the tokenizer keyed to its text, the token caches and the
step batches; rank 0 prepares, the other ranks read what it wrote once it says that worked."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from common.files import NotEnoughSpace, WriteFailed, check_free_space, dir_bytes, write_atomic
from data import DataError, eval_batches, load_corpus, load_tokenizer, save_tokenizer, tokenize_to_cache
from data import train_tokenizer
from data.source import source_record
from data.tokens import StepBatches, cache_bytes
from training.run_state.disk import checkpoint_bytes, peak_checkpoint_bytes
from training.parallel.runtime import Runtime
from training.settings import Settings
from training.stages import stage_configs


@dataclass
class Data:
    batches: StepBatches
    val_batches: list
    tokenizer: object  # None on ranks other than 0 with a prepared dataset (only rank 0 samples)
    calibration: torch.Tensor  # (B, T) validation tokens for router centring and the checks
    source: dict  # what was read, for data_source.json (data.source)
    description: str = ""  # one line: where the text came from
    val_tokens: int = 0  # tokens in the validation split

    @property
    def train_tokens(self) -> int:
        return len(self.batches.tokens)


def load_data(s: Settings, data_files: list[str] | None, out_dir: str, rt: Runtime, hf_path: str | None = None,
              origin: str = "auto", resume: bool = False) -> Data:
    """Corpus -> tokenizer (trained once, kept beside the checkpoints) -> cached token arrays -> batches."""
    log = print if rt.is_master else (lambda _: None)
    corpus = load_corpus(data_files, s.data.val_fraction, s.data.max_stories or None, s.run.seed,
                         offline_stories=s.data.offline_stories, log=log, origin=origin)
    log(f"Data: {corpus.source}; {len(corpus.train):,} training / {len(corpus.val):,} validation stories")
    tok_dir, cache = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "cache")
    error = None
    if rt.is_master:  # the other ranks read what rank 0 writes, once it says that worked
        try:
            _ensure_tokenizer(tok_dir, corpus.train, s.model.vocab_size, hf_path, resume)
            tokenizer = load_tokenizer(tok_dir)
            check_free_space(out_dir, disk_needs(s, corpus, tokenizer), dir_bytes(out_dir) if resume else 0)
            tokenize_to_cache(corpus.train, tokenizer, cache)
            tokenize_to_cache(corpus.val, tokenizer, cache)
        except (DataError, NotEnoughSpace, WriteFailed) as e:
            error = e
    if not rt.broadcast_flag(error is None):
        raise error or DataError("rank 0 could not prepare the data; see its message")
    tokenizer = load_tokenizer(tok_dir)
    train_tokens = tokenize_to_cache(corpus.train, tokenizer, cache)
    val_tokens = tokenize_to_cache(corpus.val, tokenizer, cache)
    log(f"Tokens: {len(train_tokens):,} training / {len(val_tokens):,} validation (vocab {len(tokenizer):,})")
    batches, val = token_batches(s, train_tokens, val_tokens, rt)
    return Data(batches, val, tokenizer, val[0][0][:8], source_record(corpus.origin, data_files), corpus.source,
                len(val_tokens))


def token_batches(s: Settings, train_tokens, val_tokens, rt: Runtime) -> tuple[StepBatches, list]:
    """This rank's training batches of every step and the eval batches, from the run's token arrays."""
    tc = s.train
    batches = StepBatches(train_tokens, tc.batch_size, tc.seq_len, s.run.seed, rt.rank, rt.world_size,
                          tc.grad_accum_steps, pin_memory=rt.device.type == "cuda")
    return batches, eval_batches(val_tokens, tc.batch_size, tc.seq_len, tc.eval_batches)


def load_prepared(s: Settings, path: str, out_dir: str, rt: Runtime, resume: bool) -> Data:
    """A dataset prepared once (prepare_data.py): its tokens memory-mapped in place, its tokenizer copied into the
    run (so the run directory stays whole for sampling and export). Start-up reads no text."""
    from data.prepared import open_prepared

    log = print if rt.is_master else (lambda _: None)
    prepared = open_prepared(path)
    tok_dir, error = os.path.join(out_dir, "tokenizer"), None
    if rt.is_master:
        try:
            ckpts = [checkpoint_bytes(c) for c in stage_configs(s)]
            need = {"checkpoints": peak_checkpoint_bytes(ckpts, s.train.keep_checkpoints), "tokenizer, logs": 2 << 20}
            check_free_space(out_dir, need, dir_bytes(out_dir) if resume else 0)
            if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
                save_tokenizer(prepared.tokenizer, tok_dir)
        except (NotEnoughSpace, WriteFailed) as e:
            error = e
    if not rt.broadcast_flag(error is None):
        raise error or DataError("rank 0 could not prepare the run directory; see its message")
    log(f"Data: {prepared.describe()}")
    train_tokens, val_tokens = prepared.train_tokens, prepared.val_tokens
    log(f"Tokens: {len(train_tokens):,} training / {len(val_tokens):,} validation (vocab {prepared.vocab_size:,})")
    batches, val = token_batches(s, train_tokens, val_tokens, rt)
    tokenizer = prepared.tokenizer if rt.is_master else None  # rank 0 alone samples: the others skip its import
    return Data(batches, val, tokenizer, val[0][0][:8], prepared.source_record(), prepared.describe(), len(val_tokens))


def disk_needs(s: Settings, corpus, tokenizer) -> dict[str, int]:
    """Bytes the run will write: the most checkpoints held at once, the token caches, the small files."""
    ckpts = [checkpoint_bytes(c) for c in stage_configs(s)]
    return {"checkpoints": peak_checkpoint_bytes(ckpts, s.train.keep_checkpoints),
            "token cache": cache_bytes(corpus.train, tokenizer) + cache_bytes(corpus.val, tokenizer),
            "tokenizer, logs, plot": 2 << 20}


TOKENIZER_KEY = "trained_on.sha256"  # beside tokenizer.json: the text and vocabulary it was trained for


def _tokenizer_key(stories: list[str], vocab_size: int, hf_path: str | None) -> str:
    h = hashlib.sha256(f"vocab {vocab_size}\nfrom {os.path.abspath(hf_path) if hf_path else 'training text'}\n".encode())
    for story in stories:
        data = story.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _ensure_tokenizer(tok_dir: str, stories: list[str], vocab_size: int, hf_path: str | None, resume: bool) -> None:
    """The tokenizer for exactly this text and vocabulary: reused when its key matches, else trained anew (a
    fresh start never inherits a failed start's tokenizer); a resumed run whose tokenizer does not match is
    refused. A model brought in with --init-from-hf keeps its own tokenizer."""
    key, key_path = _tokenizer_key(stories, vocab_size, hf_path), os.path.join(tok_dir, TOKENIZER_KEY)
    have = os.path.exists(os.path.join(tok_dir, "tokenizer.json"))
    found = open(key_path).read().strip() if os.path.exists(key_path) else None
    if have and (found == key or (resume and found is None)):  # None: a run saved before tokenizers were keyed
        return
    if have and resume:
        raise DataError(f"{tok_dir} was trained on other text or another vocabulary than this resume reads; "
                        "resume with the run's own data and settings, or start a new run")
    save_tokenizer(load_tokenizer(hf_path) if hf_path else train_tokenizer(stories, vocab_size), tok_dir)
    write_atomic(key_path, key + "\n")

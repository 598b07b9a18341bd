"""The checks' batch for a pair of checkpoints on disk, shared by verify_growth.py and grow_hf.py:

    tokens, note = checks_batch("story.txt", vocab, max_seq, ("small/", "big/"))   # --tokens FILE
    tokens, note = checks_batch(None, vocab, max_seq, dirs)      # the project's generated stories (DEFAULT_TEXT)

Text goes through the first tokenizer.json found in `dirs`; without one, as UTF-8 bytes (ids mod the vocabulary),
or, where asked and no text was given, as random ids. `note` says in one line which of these was done.
"""
from __future__ import annotations

import os

import torch

from data.synthetic import byte_token_batch, generate_stories

BATCH, MAX_SEQ = 8, 128  # the checks' batch: 8 sequences of up to 128 tokens (RoPE needs >= 16)
DEFAULT_TEXT = "the project's generated children's stories (data/synthetic.py, seed 0)"
MIN_SEQ = 16  # the RoPE check cannot see a break on shorter sequences


class BatchError(ValueError):
    """The checks' batch cannot be made (unreadable or too short --tokens, ids beyond the vocabulary): one line."""


def find_tokenizer(*dirs: str):
    """(tokenizers.Tokenizer, its file) from the first of dirs holding a tokenizer.json, else (None, None)."""
    from tokenizers import Tokenizer

    for d in dirs:
        file = os.path.join(d, "tokenizer.json")
        if os.path.exists(file):
            return Tokenizer.from_file(file), file
    return None, None


def read_text(text_file: str | None) -> tuple[str, str]:
    """(text, where it comes from): --tokens FILE, or the project's generated stories."""
    if not text_file:
        return " ".join(generate_stories(400, seed=0)), DEFAULT_TEXT
    try:
        with open(text_file, encoding="utf-8") as f:
            return f.read(), text_file
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"cannot read --tokens {text_file}: {e}") from None


def checks_batch(text_file: str | None, vocab: int, max_seq: int, dirs: tuple[str, ...],
                 random_without_tokenizer: bool = False) -> tuple[torch.Tensor, str]:
    """(tokens (BATCH, T), how they were made): --tokens text or the stated default, through the first tokenizer in
    dirs; without one, UTF-8 bytes (ids mod the vocabulary), or seeded random ids when random_without_tokenizer and
    no text file was given."""
    seq = min(max_seq, MAX_SEQ)
    tok, tok_file = find_tokenizer(*dirs)
    if tok is None and random_without_tokenizer and not text_file:
        ids = torch.randint(vocab, (BATCH, seq), generator=torch.Generator().manual_seed(0))
        return ids, (f"tokens: {BATCH} x {seq} random ids (seed 0) over the vocabulary of {vocab}: no tokenizer.json "
                     f"in {dirs[0]}")
    text, source = read_text(text_file)
    if tok is None:
        if len(text.encode("utf-8")) < BATCH * seq:
            raise BatchError(f"--tokens {text_file}: {len(text.encode('utf-8'))} bytes; need {BATCH * seq}")
        note = f"tokens: {BATCH} x {seq} UTF-8 bytes (mod vocab {vocab}) of {source}"
        return byte_token_batch(text, BATCH, seq) % vocab, note
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    if len(ids) < BATCH * MIN_SEQ:
        raise BatchError(f"--tokens {text_file}: {len(ids)} tokens; need at least {BATCH * MIN_SEQ}")
    seq = min(seq, len(ids) // BATCH)
    ids = ids[: BATCH * seq].view(BATCH, seq)
    if int(ids.max()) >= vocab:
        raise BatchError(f"{tok_file} gives ids up to {int(ids.max())}, beyond the models' vocabulary {vocab}")
    return ids, f"tokens: {BATCH} x {seq} ids of {source}, tokenized with {tok_file}"

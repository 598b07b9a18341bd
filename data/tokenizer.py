"""A byte-level BPE tokenizer trained on the corpus, saved in the Hugging Face format.

    from data.tokenizer import train_tokenizer, save_tokenizer, load_tokenizer
    tok = train_tokenizer(corpus.train, vocab_size=4096)    # any text round-trips: decode(encode(s)) == s
    save_tokenizer(tok, "out/tokenizer")                     # AutoTokenizer.from_pretrained("out/tokenizer") works
    tok = load_tokenizer("out/tokenizer")

`<|endoftext|>` is the only special token (id 0), the eos that ends every story in the token stream.
"""
from __future__ import annotations

import json
import os
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.text import EOT, DataError
from common.files import guarded_write

N_BYTES = 256  # the byte-level alphabet: every byte has a token, so no text is out of vocabulary
SPECIAL_TOKENS = [EOT]
MIN_VOCAB_SIZE = N_BYTES + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 1 << 16  # token ids are stored as uint16 (the token cache, prepared datasets)


def vocab_size_problem(vocab_size: int) -> str | None:
    """Why a run or a prepared dataset cannot use this vocabulary size (None if it can)."""
    if vocab_size < MIN_VOCAB_SIZE:
        return (f"vocab_size={vocab_size} must be in {MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE}: use vocab_size >= "
                f"{MIN_VOCAB_SIZE} (byte-level BPE: {N_BYTES} bytes + end of text)")
    if vocab_size > MAX_VOCAB_SIZE:
        return (f"vocab_size={vocab_size} must be in {MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE}: use vocab_size <= "
                f"{MAX_VOCAB_SIZE} (token ids are stored as uint16)")
    return None


def train_tokenizer(texts: list[str], vocab_size: int) -> "transformers.PreTrainedTokenizerFast":
    """Byte-level BPE with vocab_size tokens (bytes, merges and <|endoftext|>), trained on texts."""
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs {N_BYTES} byte tokens "
                        f"+ {len(SPECIAL_TOKENS)} special, so use vocab_size >= {MIN_VOCAB_SIZE}")
    if not any(texts):
        raise DataError("train_tokenizer: no text to train on; pass the training stories")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no added space: exact round trip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, seen or not
    tok.train_from_iterator(texts, trainer)
    # clean_up_tokenization_spaces=False: the default in older transformers turns " ." into "." on decode
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, directory: str) -> None:
    """save_pretrained into a temporary sibling directory, then rename it into place.

    A failed write is WriteFailed; the temporary is removed and an existing tokenizer in directory is kept.
    """
    directory = os.path.abspath(directory)
    tmp, old = f"{directory}.tmp-{os.getpid()}", f"{directory}.old-{os.getpid()}"
    with guarded_write(directory, _saved_bytes(tokenizer)) as write:
        shutil.rmtree(write.temporary(tmp), ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        _portable_class_name(tmp)
        if os.path.exists(directory):  # a directory cannot be renamed over a non-empty one: move it aside first
            os.replace(directory, old)
            write.on_failure(lambda: None if os.path.exists(directory) else os.replace(old, directory))
        os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _saved_bytes(tokenizer) -> int | None:
    """About what save_pretrained writes: tokenizer.json, pretty-printed, is ~2.6x the compact definition
    (measured on TinyStories at 4096 tokens: 265 KB vs 103 KB), plus small configs."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else int(2.6 * len(backend.to_str())) + 4096


def _portable_class_name(directory: str) -> None:
    """Name the class transformers 4.x knows (5.x writes TokenizersBackend, and reads both)."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def load_tokenizer(directory: str) -> "transformers.PreTrainedTokenizerFast":
    """The tokenizer saved in directory (local files only: never the hub)."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise DataError(f"{directory}: no tokenizer.json there; train and save one first (save_tokenizer)")
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    if tok.eos_token_id is None:
        raise DataError(f"{directory}: the tokenizer has no eos token; retrain it with train_tokenizer")
    return tok

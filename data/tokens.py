"""Token streams: stories tokenized once into a cached uint16 array, and the batches drawn from it.

    from data.tokens import tokenize_to_cache, TokenBatches, eval_batches
    train_ids = tokenize_to_cache(corpus.train, tok, "cache/")   # second call: read from the cache
    batches = TokenBatches(train_ids, batch_size=8, seq_len=256, seed=0)
    x, y = batches.next()                                         # (8, 256) int64; y is x shifted by one
    val = eval_batches(tokenize_to_cache(corpus.val, tok, "cache/"), 8, 256, max_batches=20)
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np
import torch

from data.text import DataError
from data.tokenizer import MAX_VOCAB_SIZE
from common.files import WriteFailed, guarded_write, remove_quietly, write_atomic

CACHE_FORMAT = 1  # bump when the cached layout changes, so old caches are not read
_ENCODE_CHUNK = 4096  # stories per batch call to the fast tokenizer


def tokenize_to_cache(stories: list[str], tokenizer, cache_dir: str) -> np.ndarray:
    """All stories' ids, each story followed by eos: a read-only uint16 memmap, cached under cache_dir.

    The cache key hashes the stories and the tokenizer, so a changed input never reads a stale cache.
    """
    eos = _check_tokenizer(tokenizer)
    if not stories:
        raise DataError("tokenize_to_cache: no stories to tokenize; check the corpus")
    key = _cache_key(stories, tokenizer)
    bin_path, meta_path = (os.path.join(cache_dir, f"tokens-{key}{ext}") for ext in (".bin", ".json"))
    if not _cache_is_valid(bin_path, meta_path):
        n_tokens = _write_tokens(stories, tokenizer, eos, bin_path)
        meta = dict(format=CACHE_FORMAT, key=key, n_stories=len(stories), n_tokens=n_tokens, dtype="uint16",
                    vocab_size=len(tokenizer), eos_id=eos)
        try:
            write_atomic(meta_path, json.dumps(meta, indent=2).encode())  # written last: it marks a complete cache
        except WriteFailed:
            remove_quietly(bin_path)  # useless without its meta, and it holds the space that just ran out
            raise
    return np.memmap(bin_path, dtype=np.uint16, mode="r")


def cache_bytes(stories: list[str], tokenizer=None, sample: int = 256) -> int:
    """Estimated bytes of the stories' token cache: 2 per token, the tokens per byte measured on an even sample
    of stories; without a tokenizer, the byte-level bound (at most one token per UTF-8 byte, plus each eos)."""
    n_bytes = sum(len(s.encode()) for s in stories)
    if tokenizer is None or not stories:
        return 2 * (n_bytes + len(stories))
    picked = stories[:: max(1, len(stories) // sample)]
    ids = tokenizer(picked, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    tokens_per_byte = sum(map(len, ids)) / max(1, sum(len(s.encode()) for s in picked))
    return 2 * (round(tokens_per_byte * n_bytes) + len(stories))


def _check_tokenizer(tokenizer) -> int:
    """The eos id; DataError if the tokenizer has none or its ids do not fit uint16."""
    if len(tokenizer) > MAX_VOCAB_SIZE:
        raise DataError(f"vocabulary of {len(tokenizer):,} tokens does not fit the uint16 token cache "
                        f"(ids 0..{MAX_VOCAB_SIZE - 1}); use vocab_size <= {MAX_VOCAB_SIZE}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token to end each story; set eos_token (train_tokenizer does)")
    return tokenizer.eos_token_id


def _cache_key(stories: list[str], tokenizer) -> str:
    """16 hex digits of a SHA-256 over the format, the whole tokenizer definition and every story."""
    h = hashlib.sha256(f"format {CACHE_FORMAT}\n".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: vocab, merges, pre-tokenizer...
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    h.update(definition.encode())
    h.update(str(tokenizer.eos_token_id).encode())
    for story in stories:
        data = story.encode()
        h.update(len(data).to_bytes(8, "little") + data)  # length prefix: ["ab", "c"] != ["a", "bc"]
    return h.hexdigest()[:16]


def _cache_is_valid(bin_path: str, meta_path: str) -> bool:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        return meta.get("format") == CACHE_FORMAT and os.path.getsize(bin_path) == 2 * meta["n_tokens"]
    except (OSError, ValueError, KeyError):
        return False


def _write_tokens(stories: list[str], tokenizer, eos: int, path: str) -> int:
    """Batch-encode stories into path (via a temporary file); return the number of tokens written.

    A failed write is WriteFailed (its size extrapolated from the stories encoded so far), the temporary removed.
    """
    tmp, n_tokens = f"{path}.tmp-{os.getpid()}", 0
    with guarded_write(path) as write:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(write.temporary(tmp), "wb") as f:
            for start in range(0, len(stories), _ENCODE_CHUNK):
                ids = _encode(stories[start:start + _ENCODE_CHUNK], tokenizer, eos)
                n_tokens += len(ids)
                done = min(start + _ENCODE_CHUNK, len(stories))
                write.needed = 2 * n_tokens * len(stories) // done  # uint16: 2 bytes per token
                f.write(ids.tobytes())
        os.replace(tmp, path)
    return n_tokens


def _encode(stories: list[str], tokenizer, eos: int) -> np.ndarray:
    """(n,) uint16: the stories' ids, each followed by eos."""
    ids = tokenizer(stories, add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    n = sum(len(x) for x in ids) + len(ids)
    return np.fromiter(itertools.chain.from_iterable(x + [eos] for x in ids), dtype=np.uint16, count=n)


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise DataError(f"too little text for one batch: {len(tokens):,} tokens, need {seq_len + 1:,}; "
                        "add data or lower seq_len")


class TokenBatches:
    """Random (x, y) windows of a token array; deterministic per (seed, rank, step), so resume is exact."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> None:
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
            raise DataError(f"TokenBatches: need batch_size >= 1, seq_len >= 1 and 0 <= rank < world_size; got "
                            f"batch_size={batch_size}, seq_len={seq_len}, rank={rank}, world_size={world_size}")
        _check_length(tokens, seq_len)
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pin_memory = pin_memory  # batches in page-locked memory: a CUDA run copies them without blocking
        self.step = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, seq_len) int64 windows at random offsets; y is x shifted by one (the next tokens)."""
        # a fresh generator per step, seeded by (seed, rank, step): the state to resume is just the step
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)  # (B, T + 1)
        self.step += 1
        return _split_xy(windows, self.pin_memory)

    def state_dict(self) -> dict:
        return dict(step=self.step, seed=self.seed, rank=self.rank, world_size=self.world_size,
                    batch_size=self.batch_size, seq_len=self.seq_len, n_tokens=len(self.tokens))

    def load_state_dict(self, state: dict) -> None:
        """Continue where state left off; DataError if it came from a differently configured stream."""
        mine = self.state_dict()
        differ = [f"{k}={state.get(k)} (now {mine[k]})" for k in mine if k != "step" and state.get(k) != mine[k]]
        if differ:
            raise DataError("cannot resume the batch stream exactly: it was saved with " + ", ".join(differ)
                            + "; use the same data and settings, or start a fresh stream")
        self.step = int(state["step"])


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to max_batches (x, y) batches of consecutive, non-overlapping windows from the start of tokens.

    Full batches only, except that text too short for one full batch gives one smaller batch.
    """
    if batch_size < 1 or seq_len < 1 or max_batches < 1:
        raise DataError(f"eval_batches: need batch_size, seq_len and max_batches >= 1; got {batch_size}, {seq_len}, "
                        f"{max_batches}")
    _check_length(tokens, seq_len)
    n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    sizes = [batch_size] * (n_windows // batch_size) or [n_windows]
    offsets = np.arange(seq_len + 1)
    batches, start = [], 0
    for size in sizes:
        starts = (start + np.arange(size)) * seq_len  # window i covers tokens[i*T : i*T + T + 1]
        batches.append(_split_xy(np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64)))
        start += size
    return batches


def _split_xy(windows: np.ndarray, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) -> contiguous x = windows[:, :-1], y = windows[:, 1:] (pinned: copied straight into pinned memory,
    no more copies than unpinned)."""
    t = torch.from_numpy(windows)
    if not pin_memory:
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()
    x, y = (torch.empty((t.shape[0], t.shape[1] - 1), dtype=t.dtype, pin_memory=True) for _ in range(2))
    return x.copy_(t[:, :-1]), y.copy_(t[:, 1:])


class StepBatches:
    """This process's share of each optimizer step's batch: the same sequences whatever the world size is now.

    A run started on S processes draws per step S x k micro-batches of batch_size sequences (k = grad_accum_steps):
    stream i's j-th is draw number step + j of TokenBatches(rank=i, world_size=S), exactly what each of S processes
    draws. W processes split the step's S*k*batch_size sequences, in that order, into W equal runs: whole micro-batches
    when W divides S*k (the same objective, the same losses to rounding), else equal parts of one micro-batch (the same
    cross-entropy; an MoE's balance loss is then taken over each part). next() gives this process's micro-batches in
    turn, micro_batches of them per step; state_dict() is TokenBatches' (world_size is S), so resume is exact.
    pin_memory (a CUDA run): batches in page-locked memory, so the loop's copy to the GPU does not block the host.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                 accum: int = 1, streams: int | None = None, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.step = 0  # draws each stream has made: accum per optimizer step, as TokenBatches counts them
        self._split(streams or world_size)

    def _split(self, streams: int) -> None:
        B, k, W = self.batch_size, self.accum, self.world_size
        rows = streams * k * B
        share = rows // W
        if rows % W or not share or (share % B and B % share):
            fits = [w for w in range(1, rows + 1) if rows % w == 0 and ((rows // w) % B == 0 or B % (rows // w) == 0)]
            raise DataError(f"a step of this run is {rows} sequences ({streams} streams x {k} micro-batches x {B}), "
                            f"which {W} processes cannot split into whole micro-batches or equal parts of one; "
                            f"resume on {', '.join(map(str, fits))} processes")
        self.streams = streams
        self._streams = [TokenBatches(self.tokens, B, self.seq_len, self.seed, i, streams, self.pin_memory)
                         for i in range(streams)]
        lo, hi = self.rank * share, (self.rank + 1) * share
        self._pieces = [(m // k, m % k, max(lo, m * B) - m * B, min(hi, (m + 1) * B) - m * B)
                        for m in range(lo // B, (hi - 1) // B + 1)]
        self._next = 0

    @property
    def micro_batches(self) -> int:
        """Micro-batches this process runs per optimizer step."""
        return len(self._pieces)

    @property
    def sequences_per_step(self) -> int:
        """Sequences per optimizer step over all processes."""
        return self.streams * self.accum * self.batch_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        stream, j, a, b = self._pieces[self._next]
        source = self._streams[stream]
        source.step = self.step + j
        x, y = source.next()
        self._next += 1
        if self._next == len(self._pieces):
            self._next, self.step = 0, self.step + self.accum
        return x[a:b], y[a:b]

    def state_dict(self) -> dict:
        return dict(step=self.step, seed=self.seed, rank=self.rank, world_size=self.streams,
                    batch_size=self.batch_size, seq_len=self.seq_len, n_tokens=len(self.tokens))

    def load_state_dict(self, state: dict) -> None:
        """Continue where state left off, on this world size; DataError if it came from another stream or the step
        cannot be split over this many processes."""
        mine = self.state_dict()
        differ = [f"{k}={state.get(k)} (now {mine[k]})" for k in ("seed", "batch_size", "seq_len", "n_tokens")
                  if state.get(k) != mine[k]]
        if differ:
            raise DataError("cannot resume the batch stream exactly: it was saved with " + ", ".join(differ)
                            + "; use the same data and settings, or start a fresh stream")
        self._split(int(state.get("world_size", 1)))
        self.step = int(state["step"])

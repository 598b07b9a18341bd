"""Score a model on whole stories: loss per token, perplexity and bits per byte (comparable across tokenizers).

    score = score_stories(model, tokenizer, stories, device="cpu")
    print(score.loss_per_token, score.perplexity, score.bits_per_byte)

The stories are one token stream, as in training: each story's tokens followed by the end-of-text (eos) token,
and one eos before the first story, so every story starts after an eos the way all but the first do in training.
Every token after that leading eos is predicted exactly once, each story's closing eos included: its nats count
(the model must know where a story ends), its bytes do not (it is a separator, not text). The bytes are the UTF-8
bytes of exactly the stories scored, so bits per byte = total nats / ln 2 / bytes.

Windows (`windows`): `context` tokens of input each; the first window scores all its predictions, every later one
only its last `stride`, which therefore see at least context - stride + 1 tokens. stride = context is the
non-overlapping scheme of the training eval (each window's first prediction sees a single token); the default
context // 2 costs twice the compute and gives every prediction after the first window half a context or more.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.run_state.checkpoint import Checkpoint, CheckpointError, find_checkpoint


@dataclass
class Score:
    """Totals over the scored text; the figures are properties of them."""

    nats: float  # summed cross-entropy of every scored prediction
    tokens: int  # predictions scored: every story's tokens and its eos
    bytes: int  # UTF-8 bytes of the stories (separators add none)
    stories: int

    @property
    def loss_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return asdict(self) | dict(loss_per_token=self.loss_per_token, perplexity=self.perplexity,
                                   bits_per_byte=self.bits_per_byte)


def story_stream(stories: list[str], tokenizer) -> Tensor:
    """(N + 1,) int64: eos, then each story's ids followed by eos."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(stories, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor([eos] + [t for story in ids for t in story + [eos]], dtype=torch.long)


def windows(n_targets: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, new) per window over a stream of n_targets + 1 tokens: input stream[start:end] predicts
    stream[start + 1:end + 1], of which the last `new` predictions are scored; each target is scored once."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride} must be between 1 and context={context}")
    out, done = [], 0
    while done < n_targets:
        end = min(n_targets, done + (stride if done else context))
        out.append((max(0, end - context), end, end - done))
        done = end
    return out


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as training runs there), plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_stream(model: nn.Module, stream: Tensor, context: int, stride: int, device: torch.device | str = "cpu",
                 batch_size: int = 8) -> tuple[float, int]:
    """(summed nats, predictions) over stream[1:], each predicted once within the windows above."""
    device = torch.device(device)
    spans = windows(len(stream) - 1, context, stride)
    length = spans[0][1] - spans[0][0]  # every window has this length (only a stream shorter than context is shorter)
    offsets = torch.arange(length + 1)
    nats, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        rows = stream[torch.tensor([s for s, _, _ in batch])[:, None] + offsets].to(device)  # (B, T + 1)
        with autocast(device):
            logits = model(rows[:, :-1])
        ce = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="none").view(len(batch), -1)
        new = torch.tensor([n for _, _, n in batch], device=device)
        scored = torch.arange(length, device=device) >= length - new[:, None]  # (B, T): the last `new` of each row
        nats += ce[scored].double().sum()
        tokens += int(scored.sum())
    return nats.item(), tokens


def score_stories(model: nn.Module, tokenizer, stories: list[str], device: torch.device | str = "cpu",
                  batch_size: int = 8, context: int | None = None, stride: int | None = None) -> Score:
    """Score of the stories as one eos-separated stream; context defaults to max_seq_len, stride to context // 2."""
    if not stories:
        raise ValueError("no stories to score")
    context = context or model.config.max_seq_len
    stream = story_stream(stories, tokenizer)
    nats, tokens = score_stream(model, stream, context, stride or max(1, context // 2), device, batch_size)
    return Score(nats, tokens, sum(len(s.encode("utf-8")) for s in stories), len(stories))


# ---------------------------------------------------------------- a checkpoint and its run, for sample.py too

@dataclass
class Loaded:
    checkpoint: Checkpoint
    run_dir: str
    model: nn.Module
    tokenizer: object  # the run's transformers tokenizer


def load_for_inference(path: str, device: torch.device) -> Loaded:
    """The checkpoint (a checkpoint directory, or a run's newest), in eval mode on device, with the run's tokenizer.

    CheckpointError (one line) when there is no usable checkpoint or no tokenizer that fits it.
    """
    from data.tokenizer import load_tokenizer

    ckpt, run_dir = find_checkpoint(path)
    tok_dir = os.path.join(run_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise CheckpointError(f"{tok_dir}: no tokenizer beside the checkpoints; pass a run directory written by "
                              "train_tinystories.py (or a checkpoint inside one)")
    tokenizer = load_tokenizer(tok_dir)
    vocab = ckpt.meta["model_config"].get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise CheckpointError(f"{tok_dir}: {len(tokenizer)} tokens but the model has vocab_size={vocab}; "
                              "the tokenizer is not this checkpoint's run's")
    return Loaded(ckpt, run_dir, ckpt.load_model(device).eval(), tokenizer)


# ---------------------------------------------------------------- what to score

def file_stories(paths: list[str]) -> tuple[list[str], str]:
    """(every story of the files, a description); DataError (one line) for a bad file."""
    from data.text import read_stories_file, check_files  # read_stories_file: the loader's own parser, without the split

    check_files(paths)
    per_file = [(p, read_stories_file(p)) for p in paths]
    listing = ", ".join(f"{os.path.basename(p)} ({len(s):,} stories)" for p, s in per_file)
    return [s for _, stories in per_file for s in stories], f"local files: {listing}"


def validation_stories(run_dir: str, ckpt: Checkpoint) -> tuple[list[str], str]:
    """(the run's held-out stories, a description), read again from what data_source.json recorded.

    DataError (one line) when the run recorded no source, or its files are gone or changed.
    """
    from data.source import load_source
    from data.text import DataError, load_corpus
    from training.settings import Settings, load_saved_settings

    recorded = load_source(run_dir)
    if recorded is None:
        raise DataError(f"{run_dir}: no data_source.json, so its validation split is unknown; pass the stories to "
                        "score with --data-files")
    origin = recorded["origin"]
    if origin == "prepared":
        return _prepared_validation(recorded)
    saved = load_saved_settings(run_dir) or ckpt.meta.get("settings")
    if not saved:
        raise DataError(f"{run_dir}: no settings.json, so its validation split is unknown; pass the stories to "
                        "score with --data-files")
    settings = Settings.from_dict(saved)
    data, seed = settings.data, settings.run.seed
    files = _recorded_files(recorded) if origin == "files" else None
    corpus = load_corpus(files, data.val_fraction, data.max_stories or None, seed,
                         hub_dataset=recorded.get("dataset", "roneneldan/TinyStories"),
                         offline_stories=data.offline_stories, log=lambda _: None, origin=origin)
    how = f"held out: val_fraction {data.val_fraction}, seed {seed}"
    if origin == "hub":
        how = "its validation split, or held out by seed if it has none"
    return corpus.val, f"validation stories of the run's data ({how}) from {corpus.source}"


def _recorded_files(recorded: dict) -> list[str]:
    """The run's data files, checked against their recorded size and SHA-256 (else another split)."""
    from common.files import sha256_file
    from data.text import DataError

    for f in recorded["files"]:
        if not os.path.isfile(f["path"]):
            raise DataError(f"the run's data file {f['path']} is gone, so its validation split cannot be rebuilt; "
                            "put it back, or score other stories with --data-files")
        if os.path.getsize(f["path"]) != f["bytes"] or sha256_file(f["path"]) != f["sha256"]:
            raise DataError(f"{f['path']} changed since the run read it (SHA-256 was {f['sha256'][:12]}...), so its "
                            "validation split cannot be rebuilt; restore it, or score other stories with --data-files")
    return [f["path"] for f in recorded["files"]]


def _prepared_validation(recorded: dict) -> tuple[list[str], str]:
    """The validation stories of the run's prepared dataset (data/prepared.py), checked by its fingerprint."""
    from data.text import DataError

    try:
        from data.prepared import open_prepared
    except ImportError:
        raise DataError(f"this run trained on a prepared dataset ({recorded.get('path')}) but data/prepared.py is not "
                        "in this checkout; update it, or score other stories with --data-files") from None
    path, want = recorded["path"], recorded.get("fingerprint")
    prepared = open_prepared(path)  # DataError: gone, incomplete or damaged
    if want and prepared.fingerprint != want:
        raise DataError(f"{path} holds other data (fingerprint {prepared.fingerprint[:12]}...) than this run "
                        f"trained on ({want[:12]}...), so its validation split is not the run's; score it with "
                        "--data-files")
    return prepared.val_stories(), f"validation stories of the prepared dataset {path}"

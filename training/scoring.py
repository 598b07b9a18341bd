"""Score a model on whole stories: loss per token, perplexity and bits per byte (comparable across tokenizers).
The math only; what evaluate.py and sample.py load (a checkpoint, its tokenizer, the stories) is training/inference.py.

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
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

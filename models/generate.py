"""Autoregressive sampling from token ids (no tokenizer here: model code imports torch only)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
             eos_id: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Extend prompt (1, T) by up to max_new_tokens; temperature 0 is greedy. Stops at eos_id."""
    ids = prompt
    window = model.config.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -window:])[:, -1, :].float()  # (1, V)
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1).cpu(), 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and nxt.item() == eos_id:
            break
    return ids

"""Text sources and token streams: local files, the hub or generated stories -> tokenizer -> cached token arrays.

    from data import load_corpus, train_tokenizer, tokenize_to_cache, TokenBatches
    from data import prepare_dataset, open_prepared          # prepared once (prepare_data.py), then memory-mapped
"""
from __future__ import annotations

import importlib

# name -> submodule; imported on first use so `import data.synthetic` stays free of torch and transformers
_EXPORTS = {
    "Corpus": "text", "DataError": "text", "check_files": "text", "load_corpus": "text", "split_stories": "text",
    "train_tokenizer": "tokenizer", "save_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "tokenize_to_cache": "tokens", "TokenBatches": "tokens", "eval_batches": "tokens",
    "generate_stories": "synthetic",
    "prepare_dataset": "prepared", "open_prepared": "prepared", "PreparedDataset": "prepared",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"data.{_EXPORTS[name]}"), name)

"""Tests of data/: corpora, tokenizer, token caches and batches, prepared datasets, generated stories."""

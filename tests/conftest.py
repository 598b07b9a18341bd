"""Shared fixtures: tiny configs and batches of real (byte-level) token ids from generated stories."""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: the workers already fill the cores, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the runs the tests start
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch.set_num_threads(1)

from config import ModelConfig
from data.synthetic import byte_token_batch, generate_stories

TEXT = " ".join(generate_stories(200, seed=0))


def tokens_for(batch: int = 4, seq_len: int = 64, offset: int = 0) -> torch.Tensor:
    return byte_token_batch(TEXT[offset:], batch, seq_len)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=300, dim=32, n_layers=2, n_heads=4, max_seq_len=128)
    return ModelConfig(**(base | overrides))


@pytest.fixture
def tokens() -> torch.Tensor:
    return tokens_for()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one thread is faster, and two threads on a busy 2-core machine can be 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""What every check test shares: the story batch they run on, and one thread (tiny tensors run faster on one)."""
import pytest
import torch

from tests.growth_pairs import story_tokens


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """(4, 64) byte ids of real text, all below 256 (the tests plant rows >= 256 that the batch must not reach)."""
    t = story_tokens(4, 64)
    assert t.shape == (4, 64) and int(t.max()) < 256
    return t


@pytest.fixture(scope="module", autouse=True)
def one_thread(single_thread):
    """conftest.single_thread for every check test."""
    yield

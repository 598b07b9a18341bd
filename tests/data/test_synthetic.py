import pytest

from data.synthetic import byte_token_batch, generate_stories


def test_stories_are_deterministic_varied_english():
    a, b = generate_stories(50, seed=1), generate_stories(50, seed=1)
    assert a == b and len(set(a)) > 40 and all(s.endswith(".") for s in a)
    assert generate_stories(5, seed=2) != generate_stories(5, seed=1)


def test_byte_token_batch_shape_and_range():
    t = byte_token_batch("hello world " * 20, 2, 16)
    assert t.shape == (2, 16) and int(t.max()) < 256
    with pytest.raises(ValueError, match="need at least 64"):
        byte_token_batch("short", 4, 16)

import torch

from models import build_model, generate
from tests.conftest import tiny_config


def test_greedy_generation_is_deterministic_and_respects_length():
    torch.manual_seed(0)
    model = build_model(tiny_config(max_seq_len=16))
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, 30, temperature=0)
    assert a.shape == (1, 33) and torch.equal(a, generate(model, prompt, 30, temperature=0))
    assert torch.equal(a[:, :3], prompt)


def test_sampling_is_seeded_and_stops_at_eos():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    prompt = torch.tensor([[5]])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(generate(model, prompt, 20, generator=g1), generate(model, prompt, 20, generator=g2))
    first = generate(model, prompt, 1, temperature=0)[0, 1].item()
    assert generate(model, prompt, 50, temperature=0, eos_id=first).shape == (1, 2)

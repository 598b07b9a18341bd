"""Models and growths the checks' tests share: tiny sources of every kind (dense, GQA, MQA, MoE, upcycled), the story
batch they run on, rebuilding a state under a wrong config, and the broken growths several check files use
(rotary pairs permuted, zeroed routers, dead experts)."""
import torch

from config import ModelConfig
from models import build_model
from transfer.simple_growth import dense_to_moe, scale_bilaterally

STORY = (
    "Once upon a time, there was a little cat named Lily. Lily lived near a big park with tall trees. "
    "One sunny day, Lily found a red ball under a bush. She was very happy and showed the ball to her "
    "friend Tom. Tom and Lily played with the ball all day long. At night, Lily went home, ate her warm "
    "soup and slept in her soft bed. The next morning a small bird came to the window and sang a sweet "
    "song. Lily smiled and waved at the bird. \"Do not be afraid,\" said Tom to the little duck by the "
    "pond. They gave the duck some bread, and the duck was happy. Sharing is good, said Mom."
)

BASE = dict(vocab_size=300, dim=32, n_layers=2, n_heads=4, max_seq_len=128)



def story_tokens(batch: int = 4, seq_len: int = 64) -> torch.Tensor:
    """(batch, seq_len) byte ids of STORY: real text, the same every time."""
    data = list(STORY.encode("ascii"))
    assert len(data) >= batch * seq_len
    return torch.tensor(data[: batch * seq_len], dtype=torch.long).view(batch, seq_len)



def gen(seed: int) -> torch.Generator:
    """A CPU generator of its own, so building a model leaves the global RNG alone."""
    return torch.Generator().manual_seed(seed)



def make_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model built without disturbing the global RNG, with RMSNorm weights away from 1 (as after
    training: all-ones norms would hide any layout bug in them)."""
    cfg = ModelConfig(**{**BASE, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg)
    g = gen(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


SOURCES = {
    "dense": {},
    "dense_untied": dict(tie_embeddings=False),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "moe": dict(n_experts=4, top_k=2),
    "moe_gqa_untied_top1": dict(n_experts=4, top_k=1, n_kv_heads=2, tie_embeddings=False),
    "wide_dense": dict(dim=64, n_heads=4),
}



def source(kind: str, seed: int = 0) -> torch.nn.Module:
    """The old model of a growth: one of SOURCES, or "upcycled" (a dense model turned into an 8-expert MoE)."""
    if kind == "upcycled":  # dense -> MoE (identical experts, small random router)
        return dense_to_moe(make_model(seed), n_experts=8, top_k=2, seed=seed)
    return make_model(seed, **SOURCES[kind])



def rebuild(cfg: ModelConfig, state: dict) -> torch.nn.Module:
    """A model for `cfg` (a wrong config, for mutations) holding `state` (shapes must match)."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    return model


def moe_pair(extra: int = 2, s: int = 2) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(old, new): a native MoE grown s times wider with `extra` inserted blocks."""
    old = source("moe")  # native MoE: 4 distinct experts, so routing matters for the function
    return old, scale_bilaterally(old, s, extra)


def permute_qk_pairs(model: torch.nn.Module) -> torch.nn.Module:
    """Rows of q and k permuted within each head from rotate-half pairs (i, i + hd/2) to interleaved pairs
    (2i, 2i + 1): the classic Meta <-> Hugging Face conversion slip, applied during growth."""
    hd = model.config.head_dim
    perm = torch.arange(hd).view(2, hd // 2).t().reshape(-1)
    with torch.no_grad():
        for b in model.blocks:
            for lin in (b.attention.q_proj, b.attention.k_proj):
                w = lin.weight
                lin.weight.copy_(w.view(-1, hd, w.shape[-1])[:, perm].reshape(w.shape))
    return model


def zero_routers(model: torch.nn.Module) -> torch.nn.Module:
    """Every router's weight zeroed in place: all experts tie, so top-k picks the same ones for every token."""
    with torch.no_grad():
        for b in model.blocks:
            b.ffn.router.weight.zero_()
    return model


def dead_expert_router(model: torch.nn.Module) -> torch.nn.Module:
    """Top-1 routers whose experts 5..7 never win (rows +a, -a, +c, -c, d, 0, 0, 0: the max of the first
    four logits is > 0): 3 of 8 experts dead while the load entropy of the other five stays ~0.55-0.6."""
    g = gen(3)
    with torch.no_grad():
        for b in model.blocks:
            w = b.ffn.router.weight
            a, c, d = (torch.randn(w.shape[1], generator=g) for _ in range(3))
            w.zero_()
            w[0], w[1], w[2], w[3], w[4] = a, -a, c, -c, d
    return model

"""Models and growths the checks' tests share: tiny sources of every kind (dense, GQA, MQA, MoE, upcycled), the story
batch they run on, rebuilding a state under a wrong config, the broken growths several check files use (rotary pairs
permuted, zeroed routers, dead experts, pure clones, noise on the wrong axis), and the assertions they share
(assert_caught: the broken growth fails the matching check with its fix, the unbroken one passes all five)."""
from dataclasses import replace

import torch

from config import ModelConfig
from models import build_model
from transfer.checks import (CheckResult, GrowthReport, check_functional_equivalence, check_rope_integrity,
                             check_router_integrity, check_symmetry_breaking, detailed_growth_check)
from transfer.simple_growth import dense_to_moe, hyperclone_weight, layer_sources, scale_bilaterally

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


# Substrings of the fix texts the brief promises (FIX_* are used too, so a reworded constant still matches).
ROPE_FIX = "heads must scale with width"
ROUTER_FIX = "divide the router's widened input weights by the scale factor"
SYMMETRY_FIX = "raise noise_std"
FUNCTIONAL_FIX = "GROWTH_VERIFICATION.md section 4"
TOL = 1e-5  # the checks' default tolerance

NOISY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weight_key(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if parts[-1] == "weight" else parts[-1]


def block_rms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().double().pow(2).mean().sqrt()


def report(old, new, tokens) -> GrowthReport:
    return detailed_growth_check(old, new, tokens, verbose=False)


def standalone(check: str, old, new, tokens) -> CheckResult:
    if check == "rope":
        return check_rope_integrity(old, new, tokens)
    if check == "router":
        return check_router_integrity(old, new, tokens)
    if check == "symmetry":
        return check_symmetry_breaking(new, tokens)  # scale factor inferred from the tiled embedding
    return check_functional_equivalence(old, new, tokens)


def assert_all_pass(rep: GrowthReport) -> None:
    assert rep.passed, rep.summary()
    assert all(r.passed for r in rep.results.values()), rep.summary()


def assert_caught(old, good, bad, tokens, check: str, fixes: tuple[str, ...], also_ok: tuple[str, ...] = ()):
    """The unbroken growth passes everything; the broken one fails `check` (standalone and inside
    detailed_growth_check) with every text of `fixes` in its message; the summary names it; the checks
    in `also_ok` still pass. Returns the detailed report of the broken growth."""
    assert_all_pass(report(old, good, tokens))
    rep = report(old, bad, tokens)
    res = rep.results[check]
    assert not res.passed, f"{check} missed the broken growth: {res.message}"
    for fix in fixes:
        assert fix in res.message, res.message
    assert not rep.passed
    summary = rep.summary()
    assert f"✗ FAILED  {res.name}" in summary
    assert f"  - {check}: " in summary
    assert "ALL CHECKS PASSED" not in summary
    alone = standalone(check, old, bad, tokens)
    assert not alone.passed, f"standalone {check} disagrees with detailed_growth_check: {alone.message}"
    for other in also_ok:
        assert rep.results[other].passed, f"{other} cried wolf: {rep.results[other].message}"
    return rep


# Broken growths several check files use, and the assertions they share.
def pure_clone(old, s, extra):
    return scale_bilaterally(old, s, extra, noise_std=0.0)


def add_independent_noise(model, s, seed=0):
    """Noise drawn independently for each input copy of every noisy weight (0.3 x block RMS / s): it does
    not sum to zero over the copies, so it does not cancel on tiled input."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if weight_key(name) in NOISY:
                eta = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3 * block_rms(p) / s
                p.copy_((p.double() + eta).to(p.dtype))
    return model


def zero_sum_over_outputs(model, s, name, seed=0):
    """Noise that sums to zero over the OUTPUT copies (wrong axis): each output copy gets a non-zero net."""
    p = dict(model.named_parameters())[name]
    with torch.no_grad():
        x = p.detach().double()
        out, in_ = x.shape[-2] // s, x.shape[-1]
        eta = torch.randn(s, out, in_, generator=gen(seed), dtype=torch.float64)
        eta = (eta - eta.mean(0, keepdim=True)) * 0.3 * block_rms(p) / s
        p.copy_((x + eta.reshape(x.shape)).to(p.dtype))
    return model


def first_vs_rest_symmetric_noise(old, s, extra, std=0.3, seed=0):
    """The natural s > 2 generalisation of Apple's [W/2 + eta, W/2 - eta]: input copy 0 gets +eta, copies
    1..s-1 each get -eta/(s-1) (zero-sum, so the function is preserved), with eta drawn per block of the
    old weight and tiled over the output copies. Copies 1..s-1 are then exchangeable everywhere: they get
    bit-identical gradients and stay identical through any training."""
    new = pure_clone(old, s, extra)
    g = gen(seed)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if weight_key(name) not in NOISY:
                continue
            x = p.detach().double()
            out, in_ = x.shape[-2] // s, x.shape[-1] // s
            eta = torch.randn(*x.shape[:-2], out, in_, generator=g, dtype=torch.float64) * std * block_rms(p)
            blk = torch.cat([eta] + [-eta / (s - 1)] * (s - 1), dim=-1)  # (..., out, s*in)
            p.copy_((x + blk.repeat(*([1] * (x.dim() - 2)), s, 1)).to(p.dtype))
    return new


def kv_heads_kept(old, s, extra, seed=0):
    """Width growth that multiplies the query heads but keeps the KV heads (k/v widen their input only)."""
    good = scale_bilaterally(old, s, extra, seed=seed)
    cfg = replace(good.config, n_kv_heads=old.config.n_kv_heads)
    state = good.state_dict()
    g = gen(100 + seed)
    for j, (src, _) in enumerate(layer_sources(old.config.n_layers, extra)):
        for proj in ("k_proj", "v_proj"):
            w = getattr(old.blocks[src].attention, proj).weight
            state[f"blocks.{j}.attention.{proj}.weight"] = hyperclone_weight(
                w, s, widen_out=False, widen_in=True, noise_std=0.3, generator=g)
    return rebuild(cfg, state)

"""Four checks that a grown model still is the small one: pure functions from (models, tokens) to a result.

    report = detailed_growth_check(old_model, new_model, tokens)   # prints VERIFICATION SUMMARY
    report.passed, report.results["symmetry"].message

Every check works on float64 copies by default, so the models keep their mode, grads, dtype and device.
In float64, correct growth drifts only by the rounding of its stored weights (~1e-7 with noise or a scale
factor that is not a power of 2, ~1e-14 otherwise) while the bugs the tests plant drift by 4e-5 to order 1:
the default tolerance of 1e-5 sits between them. GROWTH_VERIFICATION.md explains each check and its limits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import expert_load, load_entropy
from transfer.simple_growth import layer_sources

FIX_ROPE = "heads must scale with width: multiply n_heads (and n_kv_heads) by the scale factor, keep head_dim and rope_theta"
FIX_ROUTER = "divide the router's widened input weights by the scale factor (W.repeat(1, s) / s)"
FIX_INSERTED_COLLAPSE = "centre the inserted blocks' routers: scale_bilaterally(..., calibration_tokens=batch)"
FIX_SYMMETRY = "raise noise_std (scale_bilaterally's symmetry-breaking noise, relative to each block's RMS; default 0.3)"
FIX_FUNCTIONAL = "see GROWTH_VERIFICATION.md section 4 (debugging layer-wise drift)"
FIX_COLLAPSE = ("initialise the router with small random weights (router_init_std > 0), centred on real hidden "
                "states (dense_to_moe(..., calibration_tokens=batch))")


@dataclass
class CheckResult:
    name: str
    passed: bool
    message: str
    metrics: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{'✓ PASSED' if self.passed else '✗ FAILED'}  {self.name}: {self.message}"


@dataclass
class GrowthReport:
    passed: bool
    results: dict[str, CheckResult]

    def summary(self) -> str:
        bar = "=" * 72
        lines = [bar, "VERIFICATION SUMMARY", bar]
        lines += [str(r) for r in self.results.values()]
        lines.append(bar)
        if self.passed:
            lines += ["✓ ALL CHECKS PASSED", "Model is ready for Phase 3 training."]
        else:
            failed = [k for k, r in self.results.items() if not r.passed]
            lines.append(f"✗ {len(failed)} CHECK(S) FAILED: {', '.join(failed)}. Do not train the grown model; fix:")
            lines += [f"  - {k}: {self.results[k].metrics.get('fix', '')}" for k in failed]
        return "\n".join(lines)


class _Pair:
    """Float64 copies of an (old, new) pair plus what several checks share: width factor, layer map, outputs."""

    def __init__(self, old: nn.Module, new: nn.Module, tokens: Tensor | None, dtype: torch.dtype):
        self.old, self.new = _copy(old, dtype), _copy(new, dtype)
        self.oc, self.nc = old.config, new.config
        if tokens is not None and tokens.shape[1] > self.oc.max_seq_len:
            raise ValueError(f"tokens have {tokens.shape[1]} positions; the old model's max_seq_len is "
                             f"{self.oc.max_seq_len}: pass at most that many")
        self.tokens = None if tokens is None else tokens.to(next(self.new.parameters()).device)
        self.problem = _pair_problem(self.oc, self.nc)
        if self.problem is None:
            self.s = self.nc.dim // self.oc.dim
            self.layout = layer_sources(self.oc.n_layers, self.nc.n_layers - self.oc.n_layers)
        self._outputs = None

    def outputs(self):
        if self._outputs is None:
            with torch.no_grad():
                self._outputs = (self.old(self.tokens, return_details=True), self.new(self.tokens, return_details=True))
        return self._outputs

    def tile(self, x: Tensor) -> Tensor:
        return x.repeat(*([1] * (x.dim() - 1)), self.s)


def _copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    clone = copy.deepcopy(model).to(dtype)
    for p in clone.parameters():
        p.grad = None
    return clone.eval()


def _pair_problem(oc, nc) -> str | None:
    """Why the two configs cannot be a grown pair at all, or None."""
    if nc.dim % oc.dim:
        return f"new dim {nc.dim} is not an integer multiple of old dim {oc.dim}"
    if nc.n_layers < oc.n_layers:
        return f"new model has fewer layers ({nc.n_layers}) than the old one ({oc.n_layers})"
    if nc.vocab_size != oc.vocab_size:
        return f"vocabulary changed from {oc.vocab_size} to {nc.vocab_size}"
    if nc.max_seq_len < oc.max_seq_len:
        return f"context shrank: max_seq_len {oc.max_seq_len} -> {nc.max_seq_len}"
    return None


def _rel_drift(new: Tensor, ref: Tensor) -> float:
    """max |new - ref| / RMS(ref): scale-free, and the max catches a single broken unit."""
    return ((new - ref).abs().max() / ref.pow(2).mean().sqrt().clamp(min=1e-300)).item()


def _result(name: str, problems: list[str], fix: str, ok_message: str, metrics: dict) -> CheckResult:
    metrics["fix"] = fix
    if problems:
        return CheckResult(name, False, " ".join(problems) + f" Fix: {fix}.", metrics)
    return CheckResult(name, True, ok_message, metrics)


def _invalid_pair(name: str, pair: _Pair) -> CheckResult:
    return CheckResult(name, False, f"not a grown pair: {pair.problem}.", {"fix": "pass the model before and after growth"})


def _block_label(layout: list[tuple[int, bool]], j: int) -> str:
    src, inserted = layout[j]
    return f"block {j} (inserted identity copy of old block {src})" if inserted else f"block {j} (old block {src})"


# ---------------------------------------------------------------------------------------------- RoPE
def _rope(pair: _Pair, tolerance: float) -> CheckResult:
    name, oc, nc = "RoPE integrity", pair.oc, pair.nc
    if pair.problem:
        return _invalid_pair(name, pair)
    s = pair.s
    metrics = {"old_head_dim": oc.head_dim, "new_head_dim": nc.head_dim, "old_n_heads": oc.n_heads,
               "new_n_heads": nc.n_heads, "scale_factor": s}
    problems = []
    if nc.head_dim != oc.head_dim:
        problems.append(f"head_dim changed from {oc.head_dim} to {nc.head_dim}, which re-pairs RoPE's rotated "
                        f"dimensions and changes its frequencies (limit: unchanged).")
    kv_ok = nc.kv_heads == oc.kv_heads * s or nc.kv_heads == oc.kv_heads == 1  # MQA may keep one
    if nc.n_heads != oc.n_heads * s or not kv_ok:
        problems.append(f"heads went {oc.n_heads}/{oc.kv_heads} (q/kv) -> {nc.n_heads}/{nc.kv_heads} while "
                        f"width grew x{s} (expected {oc.n_heads * s}/{oc.kv_heads * s}).")
    if nc.rope_theta != oc.rope_theta:
        problems.append(f"rope_theta changed from {oc.rope_theta} to {nc.rope_theta}.")
    if problems:
        return _result(name, problems, FIX_ROPE, "", metrics)
    n = min(oc.max_seq_len, nc.max_seq_len)
    table_drift = max((pair.new.rope_cos[:n] - pair.old.rope_cos[:n]).abs().max().item(),
                      (pair.new.rope_sin[:n] - pair.old.rope_sin[:n]).abs().max().item())
    metrics["rope_table_drift"] = table_drift
    if table_drift > tolerance:
        problems.append(f"RoPE cos/sin tables differ by {table_drift:.2e} (limit {tolerance:.0e}).")
    old_out, _ = pair.outputs()
    T = pair.tokens.shape[1]
    off_diag = torch.ones(T, T, dtype=torch.bool, device=pair.tokens.device).tril(-1)  # key < query
    far = off_diag.clone()
    far[: T // 2] = False  # queries in the second half of the sequence: long-range positions
    worst, worst_far, worst_block = 0.0, 0.0, None
    with torch.no_grad():
        for j, (src, inserted) in enumerate(pair.layout):
            if inserted:  # its input is another block's output: nothing in the old model to compare with
                continue
            x_old = old_out.hidden_states[src]
            ob, nb = pair.old.blocks[src], pair.new.blocks[j]
            p_old = ob.attention.attention_probs(ob.attention_norm(x_old), pair.old.rope_cos, pair.old.rope_sin)
            x_new = pair.tile(x_old)
            p_new = nb.attention.attention_probs(nb.attention_norm(x_new), pair.new.rope_cos, pair.new.rope_sin)
            B, H = p_old.shape[:2]
            diff = (p_new.view(B, s, H, T, T) - p_old.unsqueeze(1)).abs()  # head j + H*c vs old head j
            d, d_far = diff[..., off_diag].max().item(), diff[..., far].max().item()
            if d > worst:
                worst, worst_block = d, j
            worst_far = max(worst_far, d_far)
    metrics.update(max_attention_prob_drift=worst, max_attention_prob_drift_far=worst_far, seq_len=T)
    fix = FIX_ROPE
    if worst > tolerance:
        problems.append(f"cloned heads attend differently from their source heads: attention probabilities drift "
                        f"by {worst:.2e} at off-diagonal positions (limit {tolerance:.0e}), worst in "
                        f"{_block_label(pair.layout, worst_block)}; {worst_far:.2e} at query positions >= {T // 2}.")
        fix = (f"{FIX_ROPE}; the head layout and RoPE settings are right here, so look at that block's q/k "
               f"projections and attention norm ({FIX_FUNCTIONAL})")
    ok = (f"head_dim {nc.head_dim} kept, heads {oc.n_heads}->{nc.n_heads}, theta {nc.rope_theta:g}; attention "
          f"probabilities of cloned heads match over {T} positions within {worst:.1e} (limit {tolerance:.0e})")
    return _result(name, problems, fix, ok, metrics)


def check_rope_integrity(old_model: nn.Module, new_model: nn.Module, tokens: Tensor | None = None,
                         tolerance: float = 1e-5, dtype: torch.dtype = torch.float64) -> CheckResult:
    """head_dim, head counts, theta and RoPE tables unchanged, and each cloned head's attention probabilities
    equal its source head's at every off-diagonal position of a long sequence (a short one cannot show a
    RoPE break). tokens=None uses seeded random ids of length min(max_seq_len, 128)."""
    if tokens is None:
        T = min(old_model.config.max_seq_len, new_model.config.max_seq_len, 128)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, old_model.config.vocab_size, (2, T), generator=gen)
    _require_tokens(tokens, min_len=16, why="RoPE breaks are invisible on short sequences")
    return _rope(_Pair(old_model, new_model, tokens, dtype), tolerance)


def _require_tokens(tokens: Tensor, min_len: int = 2, why: str = "") -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a LongTensor (batch, seq_len); got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.shape[1] < min_len:
        raise ValueError(f"tokens have {tokens.shape[1]} positions; need at least {min_len}" + (f" ({why})" if why else ""))


# -------------------------------------------------------------------------------------------- Router
def _router(pair: _Pair, tolerance: float, min_load_entropy: float, max_dead_fraction: float) -> CheckResult:
    name, oc, nc = "Router integrity", pair.oc, pair.nc
    if pair.problem:
        return _invalid_pair(name, pair)
    if not nc.is_moe:
        return CheckResult(name, True, "new model is dense: no router to check", {"fix": ""})
    old_out, new_out = pair.outputs()
    problems, metrics = [], {"layers": []}
    # Balance health of the grown model on its own forward pass.
    entropies, dead = [], []
    for j, logits in enumerate(new_out.router_logits):
        counts = expert_load(logits, nc.top_k)
        entropies.append(load_entropy(counts))
        dead.append(int((counts == 0).sum()))
    metrics.update(min_load_entropy=min(entropies), max_dead_experts=max(dead), n_experts=nc.n_experts)
    def collapsed(entropy: float, n_dead: int) -> bool:
        return entropy < min_load_entropy or n_dead > max_dead_fraction * nc.n_experts

    bad = [j for j in range(len(entropies)) if collapsed(entropies[j], dead[j])]
    if bad:
        j = bad[0]
        problems.append(f"routing has collapsed in {len(bad)} layer(s), first block {j}: load entropy "
                        f"{entropies[j]:.2f} of ln(E) (limit >= {min_load_entropy}), {dead[j]} of {nc.n_experts} "
                        f"experts get no token (limit {int(max_dead_fraction * nc.n_experts)}).")
        fix = FIX_COLLAPSE
        if oc.is_moe and pair.layout[j][1]:
            problems.append("That block is an inserted identity block: its router copies its neighbour's but reads "
                            "the neighbour's output.")
            fix = FIX_INSERTED_COLLAPSE
        elif oc.is_moe:
            src = pair.layout[j][0]
            old_counts = expert_load(old_out.router_logits[src], oc.top_k)
            before, dead_before = load_entropy(old_counts), int((old_counts == 0).sum())
            if collapsed(before, dead_before):
                problems.append(f"The old model's block {src} was already this unbalanced (load entropy {before:.2f}, "
                                f"{dead_before} dead): growth kept it; training the MoE phase let it collapse.")
                fix = "raise the load-balancing loss coefficient of the MoE phase and retrain it"
            else:
                fix = FIX_ROUTER
    else:
        fix = FIX_ROUTER
    compared = "old model is dense: routing checked for balance only"
    if oc.is_moe:
        drift, disagree, ambiguous, load_diff, worst = _compare_routers(pair, old_out, tolerance)
        metrics.update(router_logit_drift=drift, topk_disagreements=disagree, near_ties_excluded=ambiguous,
                       max_load_difference=load_diff)
        if drift > tolerance or disagree or load_diff > ambiguous:
            problems.append(f"router logits drifted by {drift:.2e} relative to |w_e||x_t| (limit {tolerance:.0e}), worst "
                            f"in {_block_label(pair.layout, worst)}; top-k agreement misses {disagree} token(s) "
                            f"(limit 0); per-expert load differs by up to {load_diff} token(s).")
            fix = FIX_ROUTER
        compared = (f"logits match within {drift:.1e} (limit {tolerance:.0e}), 100% top-{nc.top_k} agreement, "
                    f"identical per-expert load")
    ok = (f"{compared}; balance: load entropy >= {min(entropies):.2f} of ln(E), "
          f"{max(dead)} dead expert(s) of {nc.n_experts}")
    return _result(name, problems, fix, ok, metrics)


def _compare_routers(pair: _Pair, old_out, tolerance: float):
    """Old router logits vs the grown router fed the same (tiled) real upstream state, per original block."""
    k, worst_drift, worst_block, disagree, ambiguous, load_diff = pair.oc.top_k, 0.0, 0, 0, 0, 0
    with torch.no_grad():
        for j, (src, inserted) in enumerate(pair.layout):
            if inserted:
                continue
            ob, nb = pair.old.blocks[src], pair.new.blocks[j]
            x = old_out.hidden_states[src]
            h_old = ob.attention_residual(x, pair.old.rope_cos, pair.old.rope_sin)
            x_old = ob.ffn_norm(h_old).flatten(0, 1)  # (N, D)
            old_logits = ob.ffn.router(x_old)
            new_logits = nb.ffn.router(nb.ffn_norm(pair.tile(h_old))).flatten(0, 1)
            # Each logit is a dot product w_e . x_t: its error is judged against |w_e| |x_t|, the scale its
            # rounding lives on. Against the logits' own RMS it would be inflated wherever w_e is nearly
            # orthogonal to x_t (a router centred on the mean hidden state gives logits ~1e-3 of that scale).
            scale = torch.outer(x_old.norm(dim=-1), ob.ffn.router.weight.norm(dim=-1)).clamp(min=1e-300)
            drift = ((new_logits - old_logits).abs() / scale).max().item()
            if drift > worst_drift:
                worst_drift, worst_block = drift, j
            top = old_logits.topk(min(k + 1, old_logits.shape[-1]), dim=-1).values
            rms = old_logits.pow(2).mean().sqrt()
            tie = (top[:, k - 1] - top[:, k]).abs() <= tolerance * rms if top.shape[1] > k else torch.zeros_like(top[:, 0], dtype=torch.bool)
            same = (old_logits.topk(k).indices.sort().values == new_logits.topk(k).indices.sort().values).all(-1)
            disagree += int((~same & ~tie).sum())
            ambiguous += int(tie.sum())
            load_diff = max(load_diff, int((expert_load(new_logits, k) - expert_load(old_logits, k)).abs().max()))
    return worst_drift, disagree, ambiguous, load_diff, worst_block


def check_router_integrity(old_model: nn.Module, new_model: nn.Module, tokens: Tensor, tolerance: float = 1e-5,
                           min_load_entropy: float = 0.5, max_dead_fraction: float = 0.25,
                           dtype: torch.dtype = torch.float64) -> CheckResult:
    """Router logits on the real upstream hidden states unchanged by growth, 100% top-k agreement (near-ties
    excluded), same per-expert load; and the grown model's routing healthy (load entropy, dead experts)."""
    _require_tokens(tokens)
    return _router(_Pair(old_model, new_model, tokens, dtype), tolerance, min_load_entropy, max_dead_fraction)


# ------------------------------------------------------------------------------------------ Symmetry
def infer_scale_factor(model: nn.Module) -> int:
    """The largest s for which the embedding is exactly s copies of one block of columns (1 if none)."""
    e = model.embed.weight
    d = e.shape[1]
    for s in range(d, 1, -1):
        if d % s == 0 and torch.equal(e, e[:, : d // s].repeat(1, s)):
            return s
    return 1


def _clone_pairs(model: nn.Module, s: int) -> list[tuple[str, Tensor]]:
    """(label, grads shaped (s, units, ...)) for every family of width clones: copy c of unit u is unit u + n*c."""
    cfg = model.config
    fams = [("residual dims (embedding columns)", model.embed.weight.grad.t().reshape(s, cfg.dim // s, -1))]
    for j, b in enumerate(model.blocks):
        a = b.attention
        for proj, heads in (("q", cfg.n_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
            if heads % s:  # a single shared KV head (MQA) kept as it is: nothing cloned
                continue
            g = getattr(a, f"{proj}_proj").weight.grad
            fams.append((f"block {j} {proj}-heads", g.reshape(s, heads // s, -1)))
        if cfg.is_moe:  # (E, s*F0, D) -> (s, E*F0, D): neuron i of expert e and its copies
            g = b.ffn.gate_proj.grad
            E, F_, D = g.shape
            g = g.reshape(E, s, F_ // s, D).transpose(0, 1).reshape(s, E * (F_ // s), D)
        else:
            g = b.ffn.gate_proj.weight.grad.reshape(s, cfg.hidden_dim // s, -1)
        fams.append((f"block {j} FFN neurons", g))
    return fams


def _compared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights whose gradients _clone_pairs and the expert comparison read."""
    params = [model.embed.weight]
    for b in model.blocks:
        params += [b.attention.q_proj.weight, b.attention.k_proj.weight, b.attention.v_proj.weight]
        params.append(b.ffn.gate_proj if model.config.is_moe else b.ffn.gate_proj.weight)
    return params


def _relative_differences(g: Tensor) -> tuple[Tensor, Tensor]:
    """For g (s, units, ...): |g_a - g_b| / max(|g_a|, |g_b|) for every unit and every pair of copies a < b,
    and a mask of pairs where both gradients are exactly zero (nothing reached them: untested, not identical)."""
    g = g.flatten(2)
    a, b = torch.triu_indices(g.shape[0], g.shape[0], offset=1)
    diff = (g[a] - g[b]).norm(dim=-1)  # (pairs, units)
    norms = g.norm(dim=-1)
    scale = torch.maximum(norms[a], norms[b])
    zero = scale == 0
    return diff / scale.clamp(min=1e-300), zero


def _identical_experts(block: nn.Module) -> list[tuple[int, int]]:
    """Pairs of experts of an MoE block whose weights are exactly equal (e.g. right after upcycling)."""
    f = block.ffn
    w = torch.cat([f.gate_proj.flatten(1), f.up_proj.flatten(1), f.down_proj.flatten(1)], dim=1)
    return [(a, b) for a in range(len(w)) for b in range(a + 1, len(w)) if torch.equal(w[a], w[b])]


def _symmetry(pair_new: nn.Module, tokens: Tensor, scale_factor: int | None, min_rel: float) -> CheckResult:
    name, model = "Symmetry breaking", pair_new
    cfg = model.config
    s = scale_factor or infer_scale_factor(model)
    if cfg.dim % s or cfg.n_heads % s or cfg.hidden_dim % s:
        return CheckResult(name, False, f"scale_factor {s} does not divide the model's widths.", {"fix": "pass the right scale_factor"})
    if s == 1 and not cfg.is_moe:
        return CheckResult(name, True, "width unchanged and no experts: no cloned units to compare", {"fix": ""})
    for p in model.parameters():
        p.requires_grad_(False)
    for p in _compared_parameters(model):  # weight gradients of nothing else are needed
        p.requires_grad_(True)
    with torch.enable_grad():
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    # "Identical" = equal up to rounding: pure clones differ by 0 to ~1e-16 in float64. A threshold on each
    # pair's difference would be wrong the other way: among thousands of noisy pairs a few differ little by
    # chance, so the noise strength is judged on the median pair instead.
    identical_below = 1e3 * torch.finfo(model.embed.weight.dtype).eps
    rels, labels, untested, expert_twins, experts_tested = [], [], 0, [], 0
    if s > 1:
        for label, g in _clone_pairs(model, s):
            rel, zero = _relative_differences(g)
            untested += int(zero.sum())
            rels.append(rel[~zero])
            labels += [label] * int((~zero).sum())
    if cfg.is_moe:
        for j, b in enumerate(model.blocks):
            grads = b.ffn.gate_proj.grad.flatten(1)
            for e1, e2 in _identical_experts(b):
                scale = max(grads[e1].norm().item(), grads[e2].norm().item())
                if scale == 0:  # neither expert got a token: untested here (the router check sees dead experts)
                    untested += 1
                    continue
                experts_tested += 1
                if (grads[e1] - grads[e2]).norm().item() / scale < identical_below:
                    expert_twins.append(f"block {j} experts {e1} and {e2}")
    r = torch.cat(rels) if rels else torch.zeros(0, dtype=torch.float64)
    tested = len(r)
    identical = int((r < identical_below).sum())
    median = r.median().item() if tested else None
    metrics = {"scale_factor": s, "pairs_tested": tested + experts_tested,
               "pairs_identical": identical + len(expert_twins),
               "pairs_without_gradient": untested, "min_relative_difference": r.min().item() if tested else None,
               "median_relative_difference": median, "limit": min_rel, "identical_below": identical_below,
               "identical_expert_pairs_tested": experts_tested, "loss": loss.item()}
    problems, fix = [], FIX_SYMMETRY
    if identical:
        first = labels[int((r < identical_below).nonzero()[0])]
        problems.append(f"{identical} of {tested} cloned unit pairs receive identical gradients (relative difference "
                        f"{r.min().item():.1e}, below {identical_below:.0e}: equal up to rounding), first in {first}: "
                        f"the copies would stay identical through training and the added width would be wasted.")
    elif tested and median < min_rel:
        problems.append(f"cloned units' gradients differ by a median {median:.1e} relative (limit >= {min_rel:.0e}): "
                        f"the symmetry-breaking noise is too weak to make the copies diverge in bf16/fp32 training.")
    if expert_twins:
        problems.append(f"identical experts receive identical gradients ({'; '.join(expert_twins[:3])}"
                        f"{' ...' if len(expert_twins) > 3 else ''}): the router sends them the same tokens.")
        if not problems[:-1]:
            fix = FIX_COLLAPSE
    if tested == 0 and s > 1:
        problems.append("no gradient reached any cloned unit, so symmetry breaking cannot be shown.")
    if tested:
        ok = (f"{tested} cloned unit pairs all receive different gradients (median relative difference "
              f"{median:.2e}, limit {min_rel:.0e}; smallest {r.min().item():.1e}); {untested} pairs received no "
              f"gradient (identity blocks, idle experts)")
    elif experts_tested:
        ok = f"{experts_tested} pairs of identical experts all receive different gradients (different tokens)"
    else:
        ok = "no cloned units or identical experts with gradients to compare"
    return _result(name, problems, fix, ok, metrics)


def check_symmetry_breaking(new_model: nn.Module, tokens: Tensor, scale_factor: int | None = None,
                            min_relative_difference: float = 1e-3, max_sequences: int = 4,
                            dtype: torch.dtype = torch.float64) -> CheckResult:
    """Gradients of the full model's LM loss on real tokens (the first max_sequences rows): no cloned head,
    FFN neuron or residual dimension may get the same gradient as a copy of it (equal up to rounding), the
    median relative difference must reach min_relative_difference (noise strong enough to matter), and
    identical experts must not get identical gradients (they would if the router sent them the same
    tokens). scale_factor=None reads it off the tiled embedding."""
    _require_tokens(tokens)
    model = _copy(new_model, dtype)
    tokens = tokens[:max_sequences].to(next(model.parameters()).device)
    return _symmetry(model, tokens, scale_factor, min_relative_difference)


# ---------------------------------------------------------------------------------------- Functional
def _functional(pair: _Pair, tolerance: float) -> CheckResult:
    name = "Functional equivalence"
    if pair.problem:
        return _invalid_pair(name, pair)
    old_out, new_out = pair.outputs()
    # Every row of the table, including token ids the batch does not contain.
    drifts = {"embedding": max(_rel_drift(pair.new.embed.weight, pair.tile(pair.old.embed.weight)),
                               _rel_drift(new_out.hidden_states[0], pair.tile(old_out.hidden_states[0])))}
    for j, (src, _) in enumerate(pair.layout):
        drifts[f"block {j}"] = _rel_drift(new_out.hidden_states[j + 1], pair.tile(old_out.hidden_states[src + 1]))
    drifts["logits"] = _rel_drift(new_out.logits, old_out.logits)
    labels = ["embedding"] + [_block_label(pair.layout, j) for j in range(len(pair.layout))] + ["logits"]
    first_bad = next((i for i, d in enumerate(drifts.values()) if d > tolerance), None)
    metrics = {"layer_drift": drifts, "max_drift": max(drifts.values()), "logits_drift": drifts["logits"],
               "first_bad_layer": None if first_bad is None else labels[first_bad]}
    problems = []
    if first_bad is not None:
        d = list(drifts.values())[first_bad]
        problems.append(f"the grown model's hidden state first departs from the old one's at {labels[first_bad]}: "
                        f"relative drift {d:.2e} (limit {tolerance:.0e}; every layer before it is within the "
                        f"limit); logits drift {drifts['logits']:.2e}.")
    ok = (f"{len(pair.layout)} blocks and logits match the old model: max relative drift "
          f"{metrics['max_drift']:.1e} (limit {tolerance:.0e}), logits {drifts['logits']:.1e}")
    return _result(name, problems, FIX_FUNCTIONAL, ok, metrics)


def check_functional_equivalence(old_model: nn.Module, new_model: nn.Module, tokens: Tensor,
                                 tolerance: float = 1e-5, dtype: torch.dtype = torch.float64) -> CheckResult:
    """Layer by layer, the grown model's hidden states must be the old ones tiled, and its logits equal;
    relative drift is max |delta| / RMS(old). Names the first layer beyond tolerance. Works for dense -> MoE
    (same width) and for bilateral growth (inserted identity blocks compare with their source's output)."""
    _require_tokens(tokens, min_len=1)
    return _functional(_Pair(old_model, new_model, tokens, dtype), tolerance)


# ------------------------------------------------------------------------------------------ Upcycling
def upcycling_check(dense_model: nn.Module, moe_model: nn.Module, tokens: Tensor, tolerance: float = 1e-5,
                    verbose: bool = True) -> GrowthReport:
    """Dense -> MoE: functional equivalence and routing health (RoPE and symmetry have nothing to compare)."""
    _require_tokens(tokens, min_len=1)
    pair = _Pair(dense_model, moe_model, tokens, torch.float64)
    results = {"functional": _functional(pair, tolerance), "router": _router(pair, tolerance, 0.5, 0.25)}
    report = GrowthReport(all(r.passed for r in results.values()), results)
    if verbose:
        print("\n".join(str(r) for r in results.values()))
        print("✓ PASSED — functional equivalence confirmed" if report.passed else "✗ FAILED — see the messages above")
    return report


# ------------------------------------------------------------------------------------------ All four
def detailed_growth_check(old_model: nn.Module, new_model: nn.Module, tokens: Tensor, tolerance: float = 1e-5,
                          min_relative_difference: float = 1e-3, dtype: torch.dtype = torch.float64,
                          verbose: bool = True) -> GrowthReport:
    """Run all four checks on shared float64 copies and print the VERIFICATION SUMMARY block."""
    _require_tokens(tokens, min_len=16, why="RoPE breaks are invisible on short sequences")
    pair = _Pair(old_model, new_model, tokens, dtype)
    s = pair.s if pair.problem is None else None
    results = {
        "rope": _rope(pair, tolerance),
        "router": _router(pair, tolerance, 0.5, 0.25),
        "symmetry": _symmetry(pair.new, pair.tokens[:4], s, min_relative_difference),
        "functional": _functional(pair, tolerance),
    }
    report = GrowthReport(all(r.passed for r in results.values()), results)
    if verbose:
        print(report.summary())
    return report

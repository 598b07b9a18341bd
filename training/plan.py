"""A plan before any work: per phase, its parameters, tokens, FLOPs, epochs, peak memory, checkpoint size and time.

    plan = make_plan(settings, device_type="cuda", gpu_name=torch.cuda.get_device_name())
    print(plan.table())
    if not plan.fits(free_bytes):
        print(fit_settings(settings, lambda s: make_plan(s, device_type="cuda"), free_bytes))

Everything is computed from the stage configs (training.stages.stage_configs): no model is built, so the plan
of a GPU-sized run takes milliseconds on any machine. The memory model follows what this code allocates, one
process, eager mode (no torch.compile), and is checked against measurement by bench/memory_model.py:

  training step    fp32 weights, fp32 gradients, AdamW's two fp32 moments, and what autograd keeps for backward
                   over one micro-batch (per block, counted op by op below), the cross-entropy's fp32 (B*T, V)
                   tensors, and under bf16 autocast the bf16 copies of the matmul weights. Gradients build up in
                   backward while activations are freed, so at grad_accum_steps=1 the step peaks at weights +
                   AdamW + max(gradients, activations); with accumulation the gradients persist through the next
                   micro-batch's forward, and the peak is their sum.
  transition       both models in fp32 plus what the checks add (check_estimate): float64 block copies up to a
                   2 GiB budget (transfer.checks.stream: never a float64 copy of a whole larger model), the forward
                   outputs they share, and the float64 gradient of the objective on 4 calibration rows, in one
                   graph where the float64 blocks fit the budget and block by block where not
                   (transfer.checks.objective), then for a deepened model a stepped copy of the inserted blocks.
  eval             phase 3's clone-divergence measurement at each eval holds folded copies of the block weights.

Under parallel=fsdp (training/parallel/sharding.py) each process holds 1/world of the weights, gradients and AdamW state,
plus what FSDP gathers whole for the moment (the root's embedding and LM head, two blocks' weights and one block's
gradients before their reduce-scatter); activations are per process as before. Growth and the checks, sampling and
clone divergence run on rank 0 on a whole copy, so the transition's peak is unchanged and the eval's holds a
whole fp32 model.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from common.files import SAFETENSORS_PER_TENSOR
from common.formats import duration as _duration, human, si as _si
from config import ConfigError, ModelConfig, TrainConfig
from training import stages
from training.run_state.disk import STATE_PER_TENSOR, checkpoint_bytes, peak_checkpoint_bytes
from training.parallel.runtime import Runtime, resolve_precision
from training.settings import RunRequest, Settings
from training.costs import (attention_weights, block_matmul_weights, block_parameters, flops_per_token, parameter_count,
                            peak_flops)
from training.roofline import expected_mfu
from training.stages import stage_configs

GIB = 1024 ** 3

# The plan's time on a GPU takes each phase's MFU from training.roofline (its shapes against the GPU's ridge point
# and per-kernel overhead, or a figure gpu_check.sh measured and the repo records); DEFAULT_MFU only where the GPU's
# bandwidth is not in that table. The old flat 35% was ~2.5x optimistic at these shapes (README, "At GPU scale").
DEFAULT_MFU = 0.35  # assumed model FLOPs utilisation where no roofline can be made (an unknown GPU's bandwidth)
REFERENCE_GPU = "NVIDIA H100 80GB HBM3"  # the GPU a cuda plan assumes when none is named (planning on a CPU)
# Achieved, not peak: the cpu preset's three phases ran 42-53 GFLOP/s of model FLOPs on 2 threads (config.py's
# step times, fp32), ~20 GFLOP/s a thread. bf16 on a CPU is slower than fp32: no figure, no time.
CPU_FLOPS_PER_THREAD = 20e9
MEMORY_MARGIN = 0.1  # a plan fits when its peak x (1 + margin) is free: allocator fragmentation, CUDA context


# Tokens (eos included) per byte of a TinyStories .txt file, by vocabulary: measured on the 3.7 MB real sample
# (bench/tokenize_rate.py, bench/results/tokenize_rate.json). The plan's epochs over local files use it.
TOKENS_PER_FILE_BYTE = {2048: 0.268, 4096: 0.2472}


def estimate_tokens(n_bytes: int, vocab_size: int) -> int:
    """Tokens in n_bytes of TinyStories-like text at vocab_size (the nearest measured vocabulary's rate)."""
    nearest = min(TOKENS_PER_FILE_BYTE, key=lambda v: abs(math.log(v / vocab_size)))
    return round(n_bytes * TOKENS_PER_FILE_BYTE[nearest])


def _tensor_count(cfg: ModelConfig) -> int:
    per_block = 2 + 4 + (4 if cfg.is_moe else 3)  # two norms, q k v o, router + 3 stacked experts or 3 linears
    return 2 + (0 if cfg.tie_embeddings else 1) + cfg.n_layers * per_block


def checkpoint_size(cfg: ModelConfig) -> int:
    """training.run_state.disk.checkpoint_bytes(cfg) without building the model (same bookkeeping per tensor)."""
    per_tensor = SAFETENSORS_PER_TENSOR + 2 * STATE_PER_TENSOR
    return checkpoint_bytes(parameter_count(cfg)) + _tensor_count(cfg) * per_tensor


# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Widths:
    """Bytes per element of what autograd saves, for one precision."""

    act: int  # matmul inputs and outputs (bf16 under autocast)
    full: int  # residual stream, norms, softmaxes, the cross-entropy (fp32; float64 in the checks)
    autocast: bool  # each linear saves its own bf16 cast of its input, and weights are cast to bf16


WIDTHS = {"fp32": Widths(4, 4, False), "bf16": Widths(2, 4, True), "float64": Widths(8, 8, False)}
INDEX = 8  # int64 indices (token ids, expert ids and orders)


def block_saved_bytes(cfg: ModelConfig, w: Widths, seq_len: int = 0, math_attention: bool = False) -> int:
    """Bytes per token one block keeps for backward, op by op (measured by bench/memory_model.py's hooks)."""
    D, Dq, F, k = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.hidden_dim, cfg.top_k
    norms = 2 * (2 * w.full * D + w.full)  # each RMSNorm: its input, the normalised x and the 1/rms
    attn_in = (w.act if w.autocast else w.full) * D  # the normed input, in autocast's dtype: q, k and v share it
    # q, k, v (kv heads expanded) and the output, which o_proj reads as a view (the kernels lay it out (B, T, H, hd)),
    # and per row the logsumexp (flash / memory-efficient kernels on CUDA, torch's flash kernel on CPU) or, on
    # CUDA's math path (float64: the checks), the (T, T) probabilities
    sdpa = 4 * w.act * Dq + w.full * cfg.n_heads * (seq_len if math_attention else 1)
    if not cfg.is_moe:
        ffn_in = (w.act if w.autocast else w.full) * D  # gate and up share the normed input
        return norms + attn_in + sdpa + ffn_in + 4 * w.act * F  # gate, silu(gate), up, their product
    E = cfg.n_experts
    router = (w.act if w.autocast else w.full) * D + w.full * (E + 1 + 2 * k) + 3 * INDEX * k  # softmax, top-k, orders
    expert_in = (w.act if w.autocast else w.full) * k * D  # tokens sorted by expert (gate and up share them)
    # SwiGLU per assignment, outputs, and weighted outputs (in the outputs' dtype, which the combine keeps)
    experts = 4 * w.act * k * F + w.act * k * D + (w.act if w.autocast else w.full) * k * D
    losses = w.full * (2 * E + 2)  # balance loss softmax, z-loss logsumexp input and output
    return norms + attn_in + sdpa + router + expert_in + experts + losses


def head_saved_bytes(cfg: ModelConfig, w: Widths) -> int:
    """Bytes per token the final norm, LM head and cross-entropy keep: log-softmax output (B*T, V) in fp32."""
    lm_in = w.act * cfg.dim if w.autocast else w.full * cfg.dim
    return 2 * w.full * cfg.dim + w.full + lm_in + w.full * cfg.vocab_size + 2 * INDEX  # + input ids and targets


def head_backward_bytes(cfg: ModelConfig, w: Widths) -> int:
    """Bytes per token at backward's start besides the saved ones: the loss's and log-softmax's (B*T, V) gradients."""
    return 2 * w.full * cfg.vocab_size


def block_backward_bytes(cfg: ModelConfig, w: Widths) -> int:
    """Bytes per token in flight while one block runs backward, beyond its saved tensors: the residual gradients,
    and the SwiGLU product's two input gradients (its saved output is freed by then) or, for an MoE, the
    gradients of the sorted, weighted expert outputs (the experts themselves go one at a time)."""
    if cfg.is_moe:
        return 2 * w.full * cfg.dim + 3 * w.full * cfg.top_k * cfg.dim
    return 2 * w.full * cfg.dim + 2 * w.act * cfg.hidden_dim


def autocast_weights(cfg: ModelConfig, cached_only: bool = False) -> int:
    """bf16 copies (bytes) of the weights autocast casts: every matmul weight, the LM head included. Expert
    weights are views (unbind), never cached: cached_only leaves them out."""
    experts = cfg.n_layers * cfg.n_experts * 3 * cfg.dim * cfg.hidden_dim if cfg.is_moe else 0
    weights = cfg.n_layers * block_matmul_weights(cfg) + cfg.vocab_size * cfg.dim
    return 2 * (weights - experts if cached_only else weights)


def activation_moments(cfg: ModelConfig, tokens: int, precision: str, checkpointing: bool,
                       cast_weights: bool = True) -> dict[str, int]:
    """Bytes beyond weights, gradients and AdamW at the moments of one micro-batch that can peak. cast_weights=False:
    the weights arrive in bf16 already (FSDP's mixed precision), so autocast makes no copies of them."""
    w = WIDTHS[precision]
    L, N = cfg.n_layers, tokens
    cast = w.autocast and cast_weights
    blocks, head = N * L * block_saved_bytes(cfg, w), N * head_saved_bytes(cfg, w)
    copies = autocast_weights(cfg) if cast else 0
    head_copy = 2 * cfg.vocab_size * cfg.dim if cast else 0
    logits = N * cfg.vocab_size * (w.act + (w.full if w.autocast else 0))  # logits and their fp32 upcast
    if not checkpointing:
        return {"backward start": copies + blocks + head + N * head_backward_bytes(cfg, w),
                "last block's backward": copies + blocks + head - N * w.full * cfg.vocab_size
                + N * block_backward_bytes(cfg, w)}
    inputs = N * L * w.full * cfg.dim  # each block's input, all the checkpoint keeps
    block_copy = 2 * block_matmul_weights(cfg) if cast else 0
    cached = autocast_weights(cfg, cached_only=True) if cast else 0
    return {"forward end": cached + inputs + head + logits,
            "backward start": head_copy + inputs + head + N * head_backward_bytes(cfg, w),
            "a block's recompute": block_copy + inputs + N * (block_saved_bytes(cfg, w) + block_backward_bytes(cfg, w))}


# ------------------------------------------------------------------------------------------ memory at peak
@dataclass
class Memory:
    """Bytes at one phase's peak moments: the training step, the transition (if any), the evals."""

    terms: dict[str, int]  # the training step's parts: weights, gradients, AdamW, activations, ...
    step_peak: int
    step_moment: str  # which moment of the step peaks
    transition: dict[str, int] = field(default_factory=dict)  # the transition's parts ({} without one)
    transition_peak: int = 0
    eval_peak: int = 0

    @property
    def peak(self) -> int:
        return max(self.step_peak, self.transition_peak, self.eval_peak)

    @property
    def where(self) -> str:
        """What the phase's peak is: training step, transition checks or eval."""
        return max((self.step_peak, "training step"), (self.transition_peak, "transition checks"),
                   (self.eval_peak, "eval"))[1]


def step_memory(cfg: ModelConfig, tc: TrainConfig, precision: str, world_size: int = 1,
                parallel: str = "ddp") -> tuple[dict[str, int], int, str]:
    """(terms, peak bytes, peak moment) of one optimizer step of grad_accum_steps micro-batches, per process."""
    P, fsdp = parameter_count(cfg), parallel == "fsdp"
    shard = -(-P // world_size) if fsdp else P  # FSDP pads each tensor's rows to a multiple of world_size: ~P/world
    moments = activation_moments(cfg, tc.batch_size * tc.seq_len, precision, tc.activation_checkpointing,
                                 cast_weights=not fsdp)
    moment, activations = max(moments.items(), key=lambda kv: kv[1])
    terms = {"weights": 4 * shard, "gradients": 4 * shard, "AdamW": 8 * shard, "activations": activations}
    if fsdp:
        terms["FSDP gathered"] = fsdp_gathered_bytes(cfg, precision)
    elif world_size > 1:  # DDP's reducer keeps its own flat gradient buckets (gradient_as_bucket_view=False)
        terms["DDP buckets"] = 4 * P
    held = terms["weights"] + terms["AdamW"] + terms.get("DDP buckets", 0) + terms.get("FSDP gathered", 0)
    if tc.grad_accum_steps > 1:  # the gradients of earlier micro-batches wait through this one's forward
        return terms, held + terms["gradients"] + activations, moment
    if terms["gradients"] >= activations:
        return terms, held + terms["gradients"], "optimizer step"
    return terms, held + activations, moment


def fsdp_gathered_bytes(cfg: ModelConfig, precision: str) -> int:
    """What FSDP holds whole besides the shards, at most: the root's weights (embedding, LM head, final norm: gathered
    for the whole forward and backward), a block's weights gathered and the next one's prefetched (in the compute
    dtype), and a block's whole fp32 gradients with their copy into the reduce-scatter's input. Against 2 CPU
    processes (bench/parallel_memory.py, both ranks): one micro-batch a step, 9% under to 5% over; 2 micro-batches,
    up to 24% under. Reduce-scatter buffers live until gloo completes the collective, so FSDP's CPU peaks vary by
    about 10% between runs and ranks."""
    compute = 2 if precision == "bf16" else 4
    root = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.dim
    block = block_parameters(cfg)
    return compute * (root + 2 * block) + 2 * 4 * block


CALIBRATION_ROWS = 8  # training.pipeline.load_data: data.calibration is the first validation batch's first 8 rows
GRADIENT_ROWS = 4  # transfer.checks.suite.GRADIENT_SEQUENCES
LATER_ROWS = 2  # transfer.checks.trainability.LATER_SEQUENCES


# transfer.checks' budgets (stream.REUSE_BYTES, trainability.KEEP_GRADIENT_BYTES): float64 block copies kept for
# reuse, and the one-graph gradient with step-1 gradients kept, while the float64 blocks fit them.
REUSE_BYTES = 2 << 30
KEEP_GRADIENT_BYTES = 2 << 30
# float64 FLOP/s the checks achieve on this 2-core machine, 2 threads, quiet (bench/grow_memory.py, 2026-12-07):
# 61e9 on SmolLM-360M's shape x2 (139 s), 55e9 on the mid shape (12 s). The estimate takes the lower.
CPU_CHECK_FLOPS = 55e9


@dataclass
class CheckEstimate:
    """What the growth checks (transfer.checks.detailed_growth_check) add for a pair: bytes at their peak beyond the
    two models themselves, by term, and seconds on this machine's CPU (None on a GPU: not measured)."""

    terms: dict[str, int]
    peak_bytes: int  # the checks' own peak, models excluded
    seconds: float | None
    streamed: bool  # the new model's float64 blocks exceed the budgets: gradient block by block, blocks cast each use


def check_estimate(old: ModelConfig, new: ModelConfig, rows: int, seq_len: int,
                   device_type: str = "cpu") -> CheckEstimate:
    """Peak memory and time of the five checks on a grown pair (old -> new) with a batch of rows x seq_len tokens,
    beyond the two models (held in their own dtype by the caller). The checks hold: each model's float64 forward
    outputs (logits, hidden states, router logits); float64 block copies up to REUSE_BYTES; and at their peak the
    largest of the RoPE check's attention probabilities and the gradient pass on GRADIENT_ROWS rows. A new model
    whose float64 blocks fit the budgets is differentiated in one graph (its float64 gradient whole, activations of
    every block); a larger one block by block (every block's input and output gradient, and one at a time: the LM
    head's or embedding's float64 copy and gradient, or one block's copy, gradient and activations). On CUDA,
    float64 attention takes SDPA's math path, which saves the (T, T) probabilities. Time: float64 FLOPs at
    CPU_CHECK_FLOPS. Checked against the allocator's peak by bench/memory_model.py (transitions) and
    bench/grow_memory.py (peak RSS of whole runs, which adds the process's own ~0.4 GiB and allocator slack)."""
    f64 = WIDTHS["float64"]
    n_out, n_grad = rows * seq_len, min(GRADIENT_ROWS, rows) * (seq_len - 1)
    n_later = min(LATER_ROWS, rows) * (seq_len - 1)
    block_old, block_new = (c.n_layers * block_parameters(c) for c in (old, new))
    P_new = parameter_count(new)
    edges_new = P_new - block_new  # embedding, LM head (untied), final norm
    streamed = 8 * block_new > min(REUSE_BYTES, KEEP_GRADIENT_BYTES)

    def outputs(c: ModelConfig) -> int:  # logits, every hidden state and router logits, kept for all checks
        return n_out * 8 * (c.vocab_size + (c.n_layers + 1) * c.dim + c.n_layers * c.n_experts)

    cached, left = 0, REUSE_BYTES  # a model's float64 blocks are kept all or none, the old model's first
    for size in (8 * block_old, 8 * block_new):
        if size <= left:
            cached, left = cached + size, left - size
    terms = {"float64 blocks": cached, "check outputs": outputs(old) + outputs(new)}
    per_block = block_saved_bytes(new, f64, seq_len - 1, math_attention=device_type == "cuda")
    head = head_saved_bytes(new, f64) + head_backward_bytes(new, f64)  # the logits themselves are not kept
    block_io = 2 * n_grad * new.n_layers * new.dim * 8  # each block's input and output gradient
    inserted = new.n_layers - old.n_layers
    if not streamed:  # one graph: the whole float64 gradient, every block's activations
        grads = 8 * P_new + block_io + 8 * edges_new  # + the float64 embedding and LM head the gradient is taken at
        activations = n_grad * (new.n_layers * per_block + head) + 8 * edges_new
    else:  # block by block: the LM head's (or the embedding's) float64 copy and gradient with the head's
        # activations, or one block's copy, gradient and activations; every block's input and output gradient
        table = 8 * new.vocab_size * new.dim
        one = 8 * block_new // new.n_layers
        grads = block_io
        activations = max(2 * table + n_grad * head, 2 * one + n_grad * (per_block + block_backward_bytes(new, f64)))
    if inserted:  # trainability's second evaluation, one inserted block at a time on LATER_ROWS rows: the weights
        # step 1 moved stepped (float64 copies of o_proj, down_proj and the router; the rest had zero gradient and
        # stay), the earlier ones' gradients of the weights still waiting (all but those), one block's activations
        block = block_parameters(new)
        moved = new.dim * new.n_heads * new.head_dim + max(1, new.n_experts) * new.dim * new.hidden_dim \
            + new.n_experts * new.dim
        grads += 8 * inserted * moved + 8 * (inserted - 1) * (block - moved) + n_later * per_block
    adds = {"check activations": activations, "check gradients": grads,
            # RoPE: attention probabilities (rows, heads, T, T) of an old and a new block, and their difference
            "RoPE probabilities": rows * seq_len ** 2 * 8 * (2 * old.n_heads + 3 * new.n_heads)
            if new.dim != old.dim else 0}
    if streamed:  # the gradient pass's peak holds both
        adds = {"check gradients and activations": activations + grads, "RoPE probabilities": adds["RoPE probabilities"]}
    name, extra = max(adds.items(), key=lambda kv: kv[1])
    terms[name] = extra
    # float64 FLOPs: the old model's forward on every row and the new one's on the rows the gradient does not read
    # (its forward serves the others), RoPE's and the router's second look at the attention (about one more forward
    # of the attention weights), the gradient (forward + backward, and one more forward streamed)
    forward = (n_out * flops_per_token(old, seq_len) + (n_out - n_grad) * flops_per_token(new, seq_len)) / 3
    attention = n_out * 2 * (old.n_layers * attention_weights(old) + new.n_layers * attention_weights(new))
    gradient = n_grad * flops_per_token(new, seq_len) * (4 / 3 if streamed else 1)
    if inserted:  # the stepped forward (float32: half a float64 one) and the inserted blocks' second gradient
        gradient += n_later * flops_per_token(new, seq_len) / 3 * (0.5 + 3 * inserted / new.n_layers)
    seconds = (forward + attention + gradient) / CPU_CHECK_FLOPS if device_type == "cpu" else None
    return CheckEstimate(terms, sum(terms.values()), seconds, streamed)


def transition_memory(old: ModelConfig, new: ModelConfig, tc: TrainConfig,
                      device_type: str = "cuda") -> tuple[dict[str, int], int]:
    """(terms, peak bytes) of growing old into new and running the checks (transfer.checks.suite) on the device:
    both fp32 models and what the checks add on the calibration rows (check_estimate)."""
    rows = min(CALIBRATION_ROWS, tc.batch_size)
    checks = check_estimate(old, new, rows, tc.seq_len, device_type)
    terms = {"fp32 models": 4 * (parameter_count(old) + parameter_count(new)), **checks.terms}
    return terms, sum(terms.values())


CLONE_COPIES = 1.6  # measure_clone_divergence holds 1.59-1.61 x the fp32 block weights (measured, MoE, s=2)


def eval_memory(cfg: ModelConfig, tc: TrainConfig, precision: str, clones: bool, world_size: int = 1,
                parallel: str = "ddp") -> int:
    """Bytes at an eval during training: weights and AdamW, plus the larger of a no-grad forward at batch_size
    (hidden states kept, logits and the loss's fp32 copies) and, for a width-grown phase, clone divergence. Under
    fsdp, the shards, and on rank 0 a whole fp32 copy (clone divergence and the phase-end sample are taken on it)."""
    w, N = WIDTHS[precision], tc.batch_size * tc.seq_len
    P = parameter_count(cfg)
    forward = N * ((cfg.n_layers + 1) * w.full * cfg.dim + (w.act + w.full + (w.full if w.autocast else 0))
                   * cfg.vocab_size)
    clone_bytes = clone_divergence_bytes(cfg) if clones else 0
    if parallel != "fsdp":
        return 12 * P + max(forward + (autocast_weights(cfg, cached_only=True) if w.autocast else 0), clone_bytes)
    whole = 4 * P + clone_bytes
    return 12 * -(-P // world_size) + max(forward + fsdp_gathered_bytes(cfg, precision), whole)


def clone_divergence_bytes(cfg: ModelConfig) -> int:
    """What measure_clone_divergence holds at its peak: folded and re-laid-out copies of the block weights."""
    return int(CLONE_COPIES * 4 * cfg.n_layers * block_parameters(cfg))


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class PhasePlan:
    name: str
    label: str
    config: ModelConfig
    params: int
    active_params: int
    steps: int
    tokens: int  # steps x batch_size x grad_accum_steps x world_size x seq_len
    flops: float  # flops_per_token x tokens
    epochs: float | None  # tokens / the training tokens, when known
    memory: Memory
    checkpoint_bytes: int
    seconds: float | None  # at the plan's device throughput; None when unknown
    mfu: float | None = None  # the utilisation `seconds` assumes on a GPU (training.roofline, or stated)
    mfu_source: str | None = None  # roofline (from the shapes) | measured (gpu_check.sh, recorded) | stated | assumed

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak


@dataclass
class Plan:
    phases: list[PhasePlan]
    device: str  # "cuda" or "cpu"
    gpu_name: str | None  # the GPU the times assume (cuda)
    precision: str  # bf16 | fp32
    world_size: int
    batch_size: int
    grad_accum_steps: int
    seq_len: int
    activation_checkpointing: bool
    mfu: float | None
    device_flops: float | None  # FLOP/s the times assume per process (peak x MFU, or a CPU's achieved)
    peak_device_flops: float | None  # the GPU's datasheet peak at this precision
    disk_bytes: int  # the most the checkpoints directory holds at once
    train_tokens: int | None = None
    parallel: str = "ddp"  # RunConfig.parallel: fsdp divides weights, gradients and AdamW by world_size
    compiled: bool = False  # RunConfig.compile: the roofline's MFU is for a compiled step

    @property
    def peak_bytes(self) -> int:
        """The largest per-phase peak, transitions included (one process)."""
        return max(p.peak_bytes for p in self.phases)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.phases)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    @property
    def seconds(self) -> float | None:
        times = [p.seconds for p in self.phases]
        return None if None in times else sum(times)

    def fits(self, free_bytes: int, margin: float = MEMORY_MARGIN) -> bool:
        return self.peak_bytes * (1 + margin) <= free_bytes

    def table(self) -> str:
        """The plan as fixed-width text: work per phase, memory per phase, totals, and the assumptions."""
        name_w = max(len(p.label) for p in self.phases) + 2
        head = (f"{'phase':<{name_w}}{'params':>9}{'active':>9}{'steps':>8}{'tokens':>9}{'FLOPs':>10}"
                f"{'epochs':>8}{'ckpt':>11}{'time':>10}")
        lines = [head, "-" * len(head)]
        for p in self.phases:
            lines.append(f"{p.label:<{name_w}}{_si(p.params):>9}{_si(p.active_params):>9}{p.steps:>8}"
                         f"{_si(p.tokens):>9}{p.flops:>10.2e}{_epochs(p.epochs):>8}{human(p.checkpoint_bytes):>11}"
                         f"{_duration(p.seconds):>10}")
        epochs = self.tokens / self.train_tokens if self.train_tokens else None
        lines.append(f"{'total':<{name_w}}{'':>18}{sum(p.steps for p in self.phases):>8}{_si(self.tokens):>9}"
                     f"{self.flops:>10.2e}{_epochs(epochs):>8}{human(self.disk_bytes):>11}"
                     f"{_duration(self.seconds):>10}")
        mem = (f"{'memory (GiB)':<{name_w}}{'weights':>9}{'grads':>8}{'AdamW':>8}{'activ.':>8}{'step':>8}"
               f"{'transition':>12}{'eval':>8}{'peak':>8}  peak at")
        lines += ["", mem, "-" * len(mem)]
        for p in self.phases:
            m, t = p.memory, p.memory.terms
            lines.append(f"{p.label:<{name_w}}{_gib(t['weights']):>9}{_gib(t['gradients']):>8}{_gib(t['AdamW']):>8}"
                         f"{_gib(t['activations']):>8}{_gib(m.step_peak):>8}"
                         f"{_gib(m.transition_peak) if m.transition_peak else '-':>12}{_gib(m.eval_peak):>8}"
                         f"{_gib(m.peak):>8}  {m.where}")
        worst = max(self.phases, key=lambda p: p.peak_bytes)
        lines.append(f"{'peak':<{name_w}}{'':>57}{_gib(self.peak_bytes):>8}  {worst.label}, {worst.memory.where}")
        return "\n".join(lines + [""] + self.assumptions())

    def mfu_text(self) -> str:
        """Each phase's MFU and where it comes from, e.g. "dense 14%, moe 14%, grown 26% (roofline ...)"."""
        figures = ", ".join(f"{p.name} {100 * p.mfu:.0f}%" for p in self.phases if p.mfu)
        sources = {p.mfu_source for p in self.phases if p.mfu}
        why = {"roofline": "derived from the shapes: each matmul against the GPU's ridge point, elementwise bytes "
                           "at its bandwidth, per-kernel overhead; training/roofline.py",
               "measured": "measured by bench/gpu_check.sh, recorded in training/roofline.py",
               "stated": "as stated", "assumed": f"assumed {DEFAULT_MFU:g}: no bandwidth figure for this GPU"}
        mode = "compiled" if self.compiled else "eager"
        return f"{figures} ({mode}; {'; '.join(why[x] for x in sorted(sources))})"

    def assumptions(self) -> list[str]:
        """What the figures assume, one line each."""
        if self.device == "cuda" and self.peak_device_flops:
            speed = (f"time at MFU {self.mfu_text()} of the {self.gpu_name}'s {self.peak_device_flops / 1e12:g} "
                     f"TFLOP/s dense {self.precision} peak (datasheet, no sparsity)"
                     + (f" x {self.world_size} GPUs" if self.world_size > 1 else ""))
        elif self.device == "cuda":
            speed = f"time unknown: no peak FLOP/s for {self.gpu_name!r} at {self.precision} (give mfu and a known GPU)"
        elif self.device_flops:
            speed = (f"time at {self.device_flops / 1e9:.0f} GFLOP/s achieved on the CPU "
                     f"({CPU_FLOPS_PER_THREAD / 1e9:g} GFLOP/s a thread, measured on the cpu preset)")
        else:
            speed = f"time unknown: no CPU throughput figure for {self.precision}"
        if self.precision == "bf16" and self.parallel == "fsdp":
            precision = ("bf16 (FSDP mixed precision: fp32 master weights and AdamW, fp32 gradient reduction; each "
                         "block gathered in bf16) with autocast")
        elif self.precision == "bf16":
            precision = "bf16 autocast (fp32 weights, gradients and AdamW; bf16 matmul activations and weight copies)"
        else:
            precision = "fp32" + (" (TF32 matmuls)" if self.device == "cuda" else "")
        micro = (f"activations for one micro-batch of {self.batch_size} x {self.seq_len} tokens "
                 f"(grad_accum_steps {self.grad_accum_steps}, "
                 f"{'with' if self.activation_checkpointing else 'no'} activation checkpointing), per process, eager")
        return ["Assumptions:", f"  {speed}", f"  precision {precision}", f"  {micro}",
                "  step peak = weights + AdamW + max(gradients, activations) at grad_accum_steps 1 (gradients build up"
                " as activations are freed), + both above it",
                "  transition = both models in fp32 + the checks' float64 blocks (at most 2 GiB), outputs and float64 gradient",
                *([f"  fsdp: weights, gradients and AdamW sharded, 1/{self.world_size} each per process, + what FSDP "
                   "gathers whole for the moment; rank 0 grows, checks and samples whole copies"]
                  if self.parallel == "fsdp" else []),
                "  memory model vs measurement: bench/memory_model.py (bench/results/memory_model.json)"]


def _gib(n: int) -> str:
    g = n / GIB
    return f"{g:.3f}" if g < 1 else f"{g:.2f}" if g < 10 else f"{g:.1f}"


def _epochs(e: float | None) -> str:
    return "-" if e is None else f"{e:.2f}"


def make_plan(s: Settings, *, device_type: str = "cuda", gpu_name: str | None = None, world_size: int = 1,
              train_tokens: int | None = None, mfu: float | None = None) -> Plan:
    """The plan of the run s describes on device_type ("cuda" or "cpu"), from configs only (no model built).

    gpu_name: torch.cuda.get_device_name() (None on a cuda plan: REFERENCE_GPU); train_tokens: tokens in the
    training data, for epochs; mfu: the utilisation times assume (default DEFAULT_MFU)."""
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type={device_type!r} must be cuda or cpu")
    tc, precision = s.train, resolve_precision(s.run.precision, device_type)
    gpu = (gpu_name or REFERENCE_GPU) if device_type == "cuda" else None
    peak = peak_flops(gpu, precision) if gpu else None
    if device_type == "cuda":
        device_flops = peak * mfu if peak and mfu else None
    else:
        import torch  # the threads this process would train with

        device_flops = CPU_FLOPS_PER_THREAD * torch.get_num_threads() if precision == "fp32" else None
    configs = stage_configs(s)
    phases = []
    for i, (stage, cfg) in enumerate(zip(stages.PIPELINE, configs)):
        steps = getattr(tc, f"{stage.name}_steps")
        tokens = steps * tc.batch_size * tc.grad_accum_steps * world_size * tc.seq_len
        flops = float(flops_per_token(cfg, tc.seq_len)) * tokens
        terms, step_peak, moment = step_memory(cfg, tc, precision, world_size, s.run.parallel)
        memory = Memory(terms, step_peak, moment)
        if stage.grow is not None:
            memory.transition, memory.transition_peak = transition_memory(configs[i - 1], cfg, tc, device_type)
            if s.run.parallel == "fsdp":  # rank 0 grows and checks whole copies beside its shards of the old model
                memory.transition["old model's shards"] = 4 * -(-parameter_count(configs[i - 1]) // world_size)
                memory.transition_peak += memory.transition["old model's shards"]
        clones = stage.measure_clones is not None and cfg.dim != configs[i - 1].dim
        memory.eval_peak = eval_memory(cfg, tc, precision, clones, world_size, s.run.parallel)
        phase_mfu, source = _phase_mfu(cfg, s, gpu, precision, mfu, f"{stage.name}") if peak else (None, None)
        rate = peak * phase_mfu if phase_mfu else device_flops
        seconds = flops / (rate * world_size) if rate else None
        phases.append(PhasePlan(stage.name, stage.label, cfg, parameter_count(cfg), parameter_count(cfg, active=True),
                                steps, tokens, flops, tokens / train_tokens if train_tokens else None, memory,
                                checkpoint_size(cfg), seconds, phase_mfu, source))
    disk = peak_checkpoint_bytes([p.checkpoint_bytes for p in phases], tc.keep_checkpoints)
    return Plan(phases, device_type, gpu, precision, world_size, tc.batch_size, tc.grad_accum_steps, tc.seq_len,
                tc.activation_checkpointing, mfu, device_flops, peak, disk, train_tokens, s.run.parallel,
                s.run.compile)


# ------------------------------------------------------------------------------------------ fitting
def _phase_mfu(cfg: ModelConfig, s: Settings, gpu: str, precision: str, stated: float | None,
               phase: str) -> tuple[float, str]:
    """(MFU, where it comes from) for one phase on a GPU: stated by the caller, measured and recorded,
    derived from the shapes (training.roofline), or DEFAULT_MFU where the GPU's bandwidth is unknown."""
    if stated is not None:
        return stated, "stated"
    key = f"{phase}/{cfg.dim}x{cfg.n_layers}/e{cfg.n_experts}/{'compiled' if s.run.compile else 'eager'}"
    est = expected_mfu(cfg, s.train, gpu, precision, compiled=s.run.compile, key=key)
    return (est.mfu, est.source) if est else (DEFAULT_MFU, "assumed")


def _with_train(s: Settings, **changes) -> Settings:
    return replace(s, train=replace(s.train, **changes))


def fit_settings(s: Settings, plan_fn: Callable[[Settings], Plan], free_bytes: int,
                 margin: float = MEMORY_MARGIN) -> list[str]:
    """Overrides that make the run fit in free_bytes, each alone enough: the smallest split of batch_size into
    grad_accum_steps micro-batches (the same optimisation), then activation checkpointing (alone, or with the
    smallest split that then fits), then sharding over the processes (parallel=fsdp). [] when the plan already
    fits, or when nothing here can make it fit (the weights, AdamW state and the transition's copies alone do
    not: a smaller model or more memory)."""
    if plan_fn(s).fits(free_bytes, margin):
        return []
    tc = s.train

    def smallest_split(base: Settings) -> tuple[int, Settings] | None:
        for k in range(2, tc.batch_size + 1):
            if tc.batch_size % k == 0:
                t = _with_train(base, batch_size=tc.batch_size // k, grad_accum_steps=tc.grad_accum_steps * k)
                if plan_fn(t).fits(free_bytes, margin):
                    return k, t
        return None

    def split_flags(k: int) -> str:
        return f"--batch_size={tc.batch_size // k} --grad_accum_steps={tc.grad_accum_steps * k}"

    found = []
    split = smallest_split(s)
    if split:
        found.append(split_flags(split[0]))
    if not tc.activation_checkpointing:
        checkpointed = _with_train(s, activation_checkpointing=True)
        if plan_fn(checkpointed).fits(free_bytes, margin):
            found.append("--activation_checkpointing=true")
        else:
            both = smallest_split(checkpointed)
            if both and (not split or both[0] < split[0]):
                found.append(f"--activation_checkpointing=true {split_flags(both[0])}")
    if s.run.parallel != "fsdp" and plan_fn(replace(s, run=replace(s.run, parallel="fsdp"))).fits(free_bytes, margin):
        found.append("--parallel=fsdp")  # on more than one process: shard what each holds
    return found


# ------------------------------------------------------------------------------- the plan of a request
def plan_device(s: Settings, preset: str | None) -> tuple[str, str | None]:
    """(device type, GPU name) a plan is for: the visible GPU; a cuda run planned where none is visible assumes
    training.plan.REFERENCE_GPU (gpu name None)."""
    if s.run.device.startswith("cuda") or (s.run.device == "auto" and torch.cuda.is_available()):
        return "cuda", torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return ("cuda", None) if preset == "cuda" else ("cpu", None)


def planned_train_tokens(req: RunRequest) -> int | None:
    """Training tokens, where known without reading the text: a prepared dataset's count, or local files' size
    times the measured tokens per byte of TinyStories at this vocabulary; None for the hub."""
    if req.dataset:
        from data.prepared import open_prepared

        return len(open_prepared(req.dataset).train_tokens)
    if req.data_files:

        n_bytes = sum(os.path.getsize(f) for f in req.data_files)
        return round(estimate_tokens(n_bytes, req.settings.model.vocab_size) * (1 - req.settings.data.val_fraction))
    return None


def run_plan(req: RunRequest, world_size: int | None = None) -> Plan:
    """The plan of the run req asks for (training.plan), on the device it will use; nothing is built or read."""

    device_type, gpu_name = plan_device(req.settings, req.preset)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    return make_plan(req.settings, device_type=device_type, gpu_name=gpu_name, world_size=world,
                     train_tokens=planned_train_tokens(req))


def check_memory(req: RunRequest, rt: Runtime) -> None:
    """On CUDA, before any work: ConfigError (exit 2) when the plan's peak exceeds the device's free memory,
    naming the settings that would fit."""
    if rt.device.type != "cuda":
        return

    free, _ = torch.cuda.mem_get_info(rt.device)
    name = torch.cuda.get_device_name(rt.device)
    plan_for = lambda s: make_plan(s, device_type="cuda", gpu_name=name, world_size=rt.world_size)  # noqa: E731
    plan = plan_for(req.settings)
    if plan.fits(free):
        return
    fixes = fit_settings(req.settings, plan_for, free)
    fix = ("; or ".join(fixes) + " (then --resume picks them up)") if fixes else \
        "a smaller model (dim, n_layers, n_experts) or a GPU with more memory"
    worst = max(plan.phases, key=lambda ph: ph.peak_bytes)
    raise ConfigError(f"the run needs about {plan.peak_bytes / 2**30:.1f} GiB at its peak ({worst.label}) but "
                      f"{name} has {free / 2**30:.1f} GiB free: use {fix}")

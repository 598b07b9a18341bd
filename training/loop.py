"""The training loop, written once and called for each phase."""
from __future__ import annotations

import contextlib
import inspect
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common.formats import si as _si
from config import TrainConfig
from models import load_balancing_loss, router_z_loss
from models.moe import expert_load, load_entropy
from training.parallel.runtime import Runtime


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


class TrainingHalted(RuntimeError):
    """A watch over training found a problem the settings say must stop the run (message: what, and the fix)."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint of the last completed step was written (path in .checkpoint)."""

    def __init__(self, signal_name: str, checkpoint: str | None):
        super().__init__(signal_name)
        self.signal_name, self.checkpoint = signal_name, checkpoint


@dataclass
class Phase:
    name: str  # the pipeline stage's name: checkpoint prefix and the `phase` of metrics records
    title: str
    steps: int
    lr: float
    decays: bool = True  # False: hold lr after warm-up (TrainConfig.decay="final_phase", all but the last phase)


@dataclass
class TrainingState:
    """Where a run stands; with the weights, optimizer and RNG state beside it, all a resume needs."""

    phase: str = ""  # the phase being trained, or the last one finished ("" before the first)
    step: int = 0  # steps completed within that phase
    phase_done: bool = False
    global_step: int = 0  # steps completed over all phases
    eval_losses: dict[str, float] = field(default_factory=dict)  # final eval loss of each finished phase
    data_position: dict = field(default_factory=dict)  # TokenBatches.state_dict() after the last step
    tokens: int = 0  # tokens trained over all phases, all processes
    flops: float = 0.0  # training FLOPs over all phases, all processes (Transformer.flops_per_token)

    def begin(self, phase: str) -> None:
        self.phase, self.step, self.phase_done = phase, 0, False

    def state_dict(self) -> dict:
        return {"phase": self.phase, "step": self.step, "phase_done": self.phase_done,
                "global_step": self.global_step, "eval_losses": dict(self.eval_losses),
                "data_position": dict(self.data_position), "tokens": self.tokens, "flops": self.flops}

    def load_state_dict(self, d: dict) -> None:
        self.phase, self.step, self.phase_done = d["phase"], int(d["step"]), bool(d["phase_done"])
        self.global_step, self.eval_losses = int(d["global_step"]), dict(d["eval_losses"])
        self.data_position = dict(d.get("data_position", {}))
        self.tokens, self.flops = int(d.get("tokens", 0)), float(d.get("flops", 0.0))

    def progress(self, train_tokens: int | None) -> dict:
        """tokens, flops and epochs (over train_tokens, when known) for a metrics record."""
        epochs = self.tokens / train_tokens if train_tokens else None
        return {"tokens": self.tokens, "flops": self.flops, "epochs": epochs}


@dataclass
class PhaseRun:
    """What a phase needs besides its model and state: runtime, data, logging, saving, the stop flag."""

    rt: Runtime
    train: TrainConfig
    batches: object  # data.TokenBatches
    val_batches: list
    log: object  # training.reporting.metrics.MetricsLog (or anything with write(**record))
    save: Callable[[nn.Module, torch.optim.Optimizer, TrainingState], str | None] = lambda *a: None
    compile: bool = False
    stop_requested: Callable[[], str | None] = lambda: None  # name of a pending SIGINT/SIGTERM, if any
    # At each eval: watch(model, state) -> (extra fields of the eval record, e.g. clone_divergence; a reason to
    # halt or None). A halt saves the step and raises TrainingHalted.
    watch: Callable[[nn.Module, "TrainingState"], tuple[dict, str | None]] | None = None
    peak_flops: float | None = None  # one process's peak FLOP/s at the run's precision, for MFU (None: unknown)

    @property
    def train_tokens(self) -> int | None:
        """Tokens in the training stream (one epoch), when the batches know it."""
        tokens = getattr(self.batches, "tokens", None)
        return len(tokens) if tokens is not None else None


def lr_at(step: int, steps: int, lr: float, tc: TrainConfig, decays: bool = True) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr (or, with decays=False, lr held)."""
    if step < tc.warmup_steps:
        return lr * (step + 1) / tc.warmup_steps
    if not decays:
        return lr
    progress = (step - tc.warmup_steps) / max(1, steps - tc.warmup_steps)
    return lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, lr: float, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms), fused where torch has the kernel.

    The fused kernel (CUDA; CPU since torch 2.4) steps an MoE's 20M parameters 6x faster than the default
    foreach one on CPU; a torch or device without it gets the default implementation.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(tc.beta1, tc.beta2), fused=True)
    except (RuntimeError, ValueError):  # "fused=True requires ... supported devices"
        return torch.optim.AdamW(groups, lr=lr, betas=(tc.beta1, tc.beta2))


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tc: TrainConfig,
            stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy, total objective including the MoE balance and z losses). With stats, also
    stats["balance"]: the balance loss averaged over MoE layers (detached; 1.0 is perfect balance)."""
    out = model(x, return_details=True)
    loss = F.cross_entropy(_at_least_fp32(out.logits.flatten(0, 1)), y.flatten())
    total, balances = loss, []
    for logits in out.router_logits:
        balance = load_balancing_loss(logits, _config(model).top_k)
        total = total + tc.balance_coef * balance + tc.z_coef * router_z_loss(logits)
        balances.append(balance.detach())
    if stats is not None and balances:
        stats["balance"] = torch.stack(balances).mean()
    return loss, total


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16 logits are upcast for the softmax; a float64 model (the equality tests) keeps float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _config(model: nn.Module):
    return getattr(model, "module", model).config


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, rt: Runtime) -> float:
    """Mean next-token cross-entropy over the held-out batches."""
    return evaluate_details(model, batches, rt)[0]


@torch.no_grad()
def evaluate_details(model: nn.Module, batches: list, rt: Runtime) -> tuple[float, dict | None]:
    """(mean cross-entropy, routing over the batches or None for a dense model): routing holds, per MoE layer,
    each expert's fraction of the top-k assignments, the load entropy (1 = balanced) and the dead experts."""
    total, counts = 0.0, None  # summed on the device, read once
    for x, y in batches:
        with rt.autocast():
            out = model(to_device(x, rt.device), return_details=True)
        loss = F.cross_entropy(_at_least_fp32(out.logits.flatten(0, 1)), to_device(y, rt.device).flatten())
        total += loss.double()  # as the float64 host sum of each batch's loss was: the same digits
        if out.router_logits:
            top_k = _config(model).top_k
            layer_counts = torch.stack([expert_load(logits, top_k) for logits in out.router_logits])
            counts = layer_counts if counts is None else counts + layer_counts
    return float(total) / len(batches), None if counts is None else routing_record(counts.cpu())


def routing_record(counts: torch.Tensor) -> dict:
    """counts (layers, experts) of assignments -> the eval record's routing fields."""
    fractions = counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    return {"load": [[round(f, 6) for f in row] for row in fractions.tolist()],
            "entropy": [round(load_entropy(row), 6) for row in counts],
            "dead": [int((row == 0).sum()) for row in counts]}


def wrap_for_training(model: nn.Module, run: PhaseRun) -> nn.Module:
    """The module the loop steps through: sharded in place (fsdp; the pipeline hands it over sharded already) or
    DDP-wrapped, and/or compiled; growth always sees the raw (or sharded) model, never a wrapper."""
    if run.rt.sharded:
        from training.parallel.sharding import is_sharded, resharded, shard

        if not is_sharded(model):  # identical on every rank (same seed or checkpoint): each keeps its shards
            shard(model, run.rt)
        resharded(model)  # an eval leaves the root's weights gathered: the optimizer must see the shards
        return torch.compile(model) if run.compile else model
    wrapped = torch.compile(model) if run.compile else model
    if run.rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [run.rt.device.index] if run.rt.device.type == "cuda" else None
        # Every parameter gets a gradient every step, MoE included: the experts are stacked tensors, so an expert
        # that gets no token has zero rows in its tensors' gradient, never none (tests/training/test_hot_loop.py measures it
        # for every expert path with a collapsed router). So DDP need not search the graph for unused ones each
        # step. The RoPE tables are constant buffers, identical on every rank: not broadcast every forward.
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else {"broadcast_buffers": False}  # its older name
        wrapped = DDP(wrapped, device_ids=ids, find_unused_parameters=False, **sync)
    return wrapped


def train_phase(model: nn.Module, phase: Phase, run: PhaseRun, state: TrainingState | None = None,
                optimizer_state: dict | None = None) -> TrainingState:
    """Train `model` (raw, on the run's device, or sharded: parallel=fsdp) from state.step to the phase's end; return
    the state, whose eval_losses then hold the phase's final eval loss. A fresh state (None) starts the phase at 0.

    Each optimizer step sums the gradients of grad_accum_steps micro-batches of batch_size sequences, each
    loss divided by their number, so it equals one step over the whole batch for the cross-entropy and the
    z-loss; the balance loss is computed per micro-batch and averaged (as Megatron-LM does)."""
    rt, tc = run.rt, run.train
    if state is None:
        state = TrainingState()
        state.begin(phase.name)
    model.activation_checkpointing = tc.activation_checkpointing
    net = wrap_for_training(model, run)
    opt = make_optimizer(model, phase.lr, tc)
    if optimizer_state is not None:
        _load_optimizer(model, opt, optimizer_state, rt)
    # A step's micro-batches on this process: grad_accum_steps, or its share of the step on another world size
    k = getattr(run.batches, "micro_batches", tc.grad_accum_steps)
    sequences = getattr(run.batches, "sequences_per_step", tc.batch_size * tc.grad_accum_steps * rt.world_size)
    tokens_per_step = sequences * tc.seq_len
    flops_per_step = model.flops_per_token(tc.seq_len) * tokens_per_step
    divergence = Divergence(rt.device)
    stop_vote = rt.stop_vote()
    start_step = state.step
    t_last, last_logged = time.perf_counter(), start_step
    bar = tqdm(range(start_step, phase.steps), initial=start_step, total=phase.steps, desc=phase.name,
               disable=not rt.is_master or not sys.stderr.isatty(), dynamic_ncols=True, leave=False)
    # No step reads the device (no .item(), no flag) except where it logs, evaluates or saves: the host queues
    # step after step and the GPU never waits for it. tests/training/test_hot_loop.py counts the reads.
    for step in bar:
        _stop_if_requested(model, opt, run, state, start_step, stop_vote)
        lr = lr_at(step, phase.steps, phase.lr, tc, phase.decays)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, total, balance = accumulate_gradients(net, run, k)
        divergence.record(total, step + 1)
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step, state.global_step = step + 1, state.global_step + 1
        state.tokens, state.flops = state.tokens + tokens_per_step, state.flops + flops_per_step
        state.data_position = run.batches.state_dict()
        done = step + 1 == phase.steps
        due = [(step + 1) % n == 0 or done for n in (tc.log_interval, tc.eval_interval, tc.checkpoint_interval)]
        halt_reason = None
        # The divergence flag is read only at a step that logs, evaluates or saves, before any of that (every rank
        # alike): a NaN is found up to that many steps late, never logged nor saved. The message names the step
        # that found it and the first non-finite step (this rank's, with its value).
        if any(due) and rt.any(divergence.flag):
            raise TrainingDiverged(divergence.describe(phase.name, step + 1))
        if due[0]:
            now = time.perf_counter()
            steps, seconds = step + 1 - last_logged, now - t_last
            t_last, last_logged = now, step + 1
            record = _throughput(steps, seconds, tokens_per_step, flops_per_step, run)
            record.update(loss=rt.mean(loss).item(), lr=lr, **state.progress(run.train_tokens))  # the global batch's
            if balance is not None:
                record["balance"] = rt.mean(balance).item()
            if rt.is_master:
                bar.write(_train_line(step + 1, record))
            run.log.write(kind="train", phase=phase.name, step=step + 1, global_step=state.global_step,
                          time=time.time(), **record)
        if due[1]:
            eval_loss, routing = evaluate_details(model, run.val_batches, rt)
            if rt.is_master:
                bar.write(f"step {step + 1} | eval loss {eval_loss:.4f}")
            if done:
                state.eval_losses[phase.name] = eval_loss
            extra, halt_reason = run.watch(model, state) if run.watch else ({}, None)
            if routing is not None:
                extra["routing"] = routing
            run.log.write(kind="eval", phase=phase.name, step=step + 1, global_step=state.global_step,
                          loss=eval_loss, time=time.time(), **state.progress(run.train_tokens), **extra)
        state.phase_done = done
        if due[2] or halt_reason:  # a halt keeps the steps done: resuming with the fix loses nothing
            run.save(model, opt, state)
        if halt_reason:
            raise TrainingHalted(halt_reason)
    stop_vote.finish()
    bar.close()
    return state


class Divergence:
    """Whether the objective has been NaN or inf, the first such step and its value, all kept on the device and
    updated without a host read (a few scalar ops a step); read only when the loop checks it."""

    def __init__(self, device: torch.device) -> None:
        self.first_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet
        self.first_value = torch.zeros((), device=device)

    def record(self, total: torch.Tensor, step: int) -> None:
        new = (self.first_step == 0) & ~torch.isfinite(total)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_value = torch.where(new, total.to(self.first_value.dtype), self.first_value)

    @property
    def flag(self) -> torch.Tensor:
        return self.first_step > 0

    def describe(self, phase: str, found_at: int) -> str:
        """The halt's message (two host reads, once)."""
        first = int(self.first_step.item())
        if not first:
            return f"loss became non-finite on another process at {phase} step {found_at}"
        value = self.first_value.item()
        if first == found_at:
            return f"loss became {value} at {phase} step {found_at}"
        return (f"loss became {value} at {phase} step {found_at} (non-finite since step {first}; checked at steps "
                "that log, evaluate or save)")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on device. To CUDA without blocking the host: from pinned memory (StepBatches pins its batches
    on CUDA runs; others are pinned here), ordered on the stream before the kernels that read it. Elsewhere as is.
    No prefetch on a side stream: with no host reads the host runs ahead of the GPU, so the next batch's copy is
    queued while the GPU still computes; a side stream would overlap only B x T int64 (tens of KB), and drawing a
    batch ahead would put StepBatches' saved position past the steps trained."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def accumulate_gradients(net: nn.Module, run: PhaseRun, k: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward over k micro-batches; the mean cross-entropy, mean objective and mean balance loss (None for a dense
    model), all detached and left on the device. DDP reduces gradients only on the last micro-batch. FSDP reduces
    (reduce-scatters) every one: its no_sync analogue, set_requires_gradient_sync(False), would hold every
    parameter's whole gradient between micro-batches, undoing the gradients' sharding in exactly the runs that
    accumulate because memory is short; the price is one reduce-scatter per micro-batch instead of per step."""
    rt, tc = run.rt, run.train
    loss_sum = total_sum = balance_sum = None
    for micro in range(k):
        x, y = run.batches.next()
        stats: dict = {}
        last = micro == k - 1
        with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
            with rt.autocast():
                loss, total = lm_loss(net, to_device(x, rt.device), to_device(y, rt.device), tc, stats)
            (total / k).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        total_sum = total.detach() if total_sum is None else total_sum + total.detach()
        if "balance" in stats:
            balance_sum = stats["balance"] if balance_sum is None else balance_sum + stats["balance"]
    return loss_sum / k, total_sum / k, None if balance_sum is None else balance_sum / k


def _load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, state: dict | None, rt: Runtime) -> None:
    """A saved optimizer state (one process's state_dict(), whatever world size wrote it) into opt."""
    if rt.sharded:
        from training.parallel.sharding import load_optimizer

        load_optimizer(model, opt, state, rt)
    else:
        opt.load_state_dict(state)


def _throughput(steps: int, seconds: float, tokens_per_step: int, flops_per_step: float, run: PhaseRun) -> dict:
    """Speed over the steps since the last log line: ms/step, tokens/s (all processes and each), MFU."""
    seconds = max(seconds, 1e-9)
    world = run.rt.world_size
    tokens_per_s = steps * tokens_per_step / seconds
    mfu = steps * flops_per_step / seconds / (run.peak_flops * world) if run.peak_flops else None
    return {"ms_per_step": 1000 * seconds / steps, "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_process": tokens_per_s / world, "mfu": mfu}


def _train_line(step: int, r: dict) -> str:
    parts = [f"step {step}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"{r['ms_per_step']:.0f} ms/step",
             f"{_si(r['tokens_per_s'])} tok/s"]
    if r["mfu"] is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    seen = f"{_si(r['tokens'])} tokens"
    parts.append(seen + (f" ({r['epochs']:.2f} epochs)" if r["epochs"] is not None else ""))
    return " | ".join(parts)


def _stop_if_requested(model: nn.Module, opt, run: PhaseRun, state: TrainingState, start_step: int,
                       vote) -> None:
    """On SIGINT/SIGTERM, save the completed steps and raise TrainingInterrupted (every rank at the same step: under
    torchrun one step after the signal, when the vote posted then comes back; runtime.StopVote)."""
    signal_name = run.stop_requested()
    if run.rt.distributed:  # every rank takes part, signalled or not, and all stop at the same step if any was
        anyone = vote.post(signal_name is not None)
        signal_name = (signal_name or "SIGTERM") if anyone else None
    if signal_name:  # stop between steps: the checkpoint holds exactly the completed steps
        path = run.save(model, opt, state) if state.step > start_step else None
        raise TrainingInterrupted(signal_name, path)

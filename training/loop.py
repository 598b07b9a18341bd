"""The training loop, written once and called for each phase."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import TrainConfig
from models import load_balancing_loss, router_z_loss
from training.runtime import Runtime


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

    def begin(self, phase: str) -> None:
        self.phase, self.step, self.phase_done = phase, 0, False

    def state_dict(self) -> dict:
        return {"phase": self.phase, "step": self.step, "phase_done": self.phase_done,
                "global_step": self.global_step, "eval_losses": dict(self.eval_losses),
                "data_position": dict(self.data_position)}

    def load_state_dict(self, d: dict) -> None:
        self.phase, self.step, self.phase_done = d["phase"], int(d["step"]), bool(d["phase_done"])
        self.global_step, self.eval_losses = int(d["global_step"]), dict(d["eval_losses"])
        self.data_position = dict(d.get("data_position", {}))


@dataclass
class PhaseRun:
    """What a phase needs besides its model and state: runtime, data, logging, saving, the stop flag."""

    rt: Runtime
    train: TrainConfig
    batches: object  # data.TokenBatches
    val_batches: list
    log: object  # training.report.MetricsLog (or anything with write(**record))
    save: Callable[[nn.Module, torch.optim.Optimizer, TrainingState], str | None] = lambda *a: None
    compile: bool = False
    stop_requested: Callable[[], str | None] = lambda: None  # name of a pending SIGINT/SIGTERM, if any
    # At each eval: watch(model, state) -> (extra fields of the eval record, e.g. clone_divergence; a reason to
    # halt or None). A halt saves the step and raises TrainingHalted.
    watch: Callable[[nn.Module, "TrainingState"], tuple[dict, str | None]] | None = None


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


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tc: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy, total objective including the MoE balance and z losses)."""
    out = model(x, return_details=True)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
    total = loss
    for logits in out.router_logits:
        top_k = _config(model).top_k
        total = total + tc.balance_coef * load_balancing_loss(logits, top_k) + tc.z_coef * router_z_loss(logits)
    return loss, total


def _config(model: nn.Module):
    return getattr(model, "module", model).config


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, rt: Runtime) -> float:
    total = 0.0
    for x, y in batches:
        with rt.autocast():
            logits = model(x.to(rt.device))
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(rt.device).flatten()).item()
    return total / len(batches)


def _wrap(model: nn.Module, run: PhaseRun) -> nn.Module:
    """The module the loop steps through: compiled and/or DDP-wrapped; growth always sees the raw model."""
    wrapped = torch.compile(model) if run.compile else model
    if run.rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [run.rt.device.index] if run.rt.device.type == "cuda" else None
        # Experts that get no token in a step have no gradient: DDP must be told to expect that.
        wrapped = DDP(wrapped, device_ids=ids, find_unused_parameters=model.config.is_moe)
    return wrapped


def train_phase(model: nn.Module, phase: Phase, run: PhaseRun, state: TrainingState | None = None,
                optimizer_state: dict | None = None) -> TrainingState:
    """Train `model` (raw, on the run's device) from state.step to the phase's end; return the state, whose
    eval_losses then hold the phase's final eval loss. A fresh state (None) starts the phase at step 0."""
    rt, tc = run.rt, run.train
    if state is None:
        state = TrainingState()
        state.begin(phase.name)
    net = _wrap(model, run)
    opt = make_optimizer(model, phase.lr, tc)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    nonfinite = torch.zeros((), dtype=torch.bool, device=rt.device)
    start_step = state.step
    t_last, last_logged = time.perf_counter(), start_step
    bar = tqdm(range(start_step, phase.steps), initial=start_step, total=phase.steps, desc=phase.name,
               disable=not rt.is_master or not sys.stderr.isatty(), dynamic_ncols=True, leave=False)
    for step in bar:
        _stop_if_requested(model, opt, run, state, start_step)
        lr = lr_at(step, phase.steps, phase.lr, tc, phase.decays)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = run.batches.next()
        with rt.autocast():
            loss, total = lm_loss(net, x.to(rt.device), y.to(rt.device), tc)
        total.backward()
        nonfinite |= ~torch.isfinite(total.detach())
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step, state.global_step = step + 1, state.global_step + 1
        state.data_position = run.batches.state_dict()
        done = step + 1 == phase.steps
        due = [(step + 1) % n == 0 or done for n in (tc.log_interval, tc.eval_interval, tc.checkpoint_interval)]
        halt_reason = None
        if any(due) and nonfinite.item():  # checked before anything after the divergence is logged or saved
            raise TrainingDiverged(f"loss became {total.item()} at {phase.name} step {step + 1}")
        if due[0]:
            now = time.perf_counter()
            ms, t_last, last_logged = 1000 * (now - t_last) / (step + 1 - last_logged), now, step + 1
            value = loss.item()
            if rt.is_master:
                bar.write(f"step {step + 1} | loss {value:.4f} | lr {lr:.2e} | {ms:.0f} ms/step")
            run.log.write(kind="train", phase=phase.name, step=step + 1, global_step=state.global_step,
                          loss=value, lr=lr, time=time.time())
        if due[1]:
            eval_loss = evaluate(model, run.val_batches, rt)
            if rt.is_master:
                bar.write(f"step {step + 1} | eval loss {eval_loss:.4f}")
            if done:
                state.eval_losses[phase.name] = eval_loss
            extra, halt_reason = run.watch(model, state) if run.watch else ({}, None)
            run.log.write(kind="eval", phase=phase.name, step=step + 1, global_step=state.global_step,
                          loss=eval_loss, time=time.time(), **extra)
        state.phase_done = done
        if due[2] or halt_reason:  # a halt keeps the steps done: resuming with the fix loses nothing
            run.save(model, opt, state)
        if halt_reason:
            raise TrainingHalted(halt_reason)
    bar.close()
    return state


def _stop_if_requested(model: nn.Module, opt, run: PhaseRun, state: TrainingState, start_step: int) -> None:
    """On SIGINT/SIGTERM, save the completed steps and raise TrainingInterrupted (every rank at the same step)."""
    signal_name = run.stop_requested()
    if run.rt.distributed:  # every rank must stop at the same step, or the next collective hangs
        signal_name = signal_name or ("SIGTERM" if run.rt.broadcast_flag(bool(signal_name)) else None)
    if signal_name:  # stop between steps: the checkpoint holds exactly the completed steps
        path = run.save(model, opt, state) if state.step > start_step else None
        raise TrainingInterrupted(signal_name, path)

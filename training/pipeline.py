"""The orchestration that trains and grows through the stage table (training/stages.py), described once there:

    PIPELINE = (dense, moe, grown)   # each Stage: its name, how it is grown from the previous stage, its check

A stage with `grow` begins with a transition: the previous stage's trained model is grown into this stage's,
and `check` verifies the pair on rank 0 before any training. A stage named X trains for TrainConfig.X_steps at
peak LR TrainConfig.X_lr; with decay=final_phase only the last stage decays its LR. Checkpoint names, metrics
records, the summary, the plots and the growth benchmark's arms all derive from this table: a fourth stage (a
second growth, say) is one entry here plus its two settings.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
from torch import nn

from common.files import WriteFailed, write_atomic
from config import config_to_dict
from data.source import SOURCE_FILE
from models import build_model, generate
from training import stages
from training.run_state.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from training.reporting.html_report import write_report
from training.loop import (Phase, PhaseRun, TrainingDiverged, TrainingHalted, TrainingInterrupted, TrainingState,
                           evaluate_details, train_phase)
from training.messages import halt, resume_command, resume_hint, summary
from training.costs import parameter_count, peak_flops
from training.plan import check_memory
from training.reporting.metrics import MetricsLog, phase_header
from training.run_data import Data, load_data, load_prepared
from training.parallel.runtime import Runtime, collective_timeout, resolve_precision
from training.run_state.disk import checkpoint_bytes
from training.settings import RunRequest, Settings, build_settings, save_settings
from training.parallel.sharding import full_model, gather_optimizer, is_sharded, sharded_from
from training.stages import Stage, stage_index
from training.transition import transition, transition_record
from transfer import judge_clone_divergence

def stage_phase(stage: Stage, s: Settings, last: bool) -> Phase:
    """What the loop trains in a stage: its steps and LR from the settings, decaying in the last stage (or in
    every stage with decay=every_phase)."""
    tc = s.train
    return Phase(stage.name, stage.title, getattr(tc, f"{stage.name}_steps"), getattr(tc, f"{stage.name}_lr"),
                 decays=last or tc.decay == "every_phase")








# ------------------------------------------------------------------------------------------- the plan
















SAMPLE_PROMPT = "Once upon a time"


def sample_story(model: nn.Module, data: Data, s: Settings, rt: Runtime) -> str:
    prompt = torch.tensor([data.tokenizer.encode(SAMPLE_PROMPT)], device=rt.device)
    gen = torch.Generator().manual_seed(s.run.seed)
    ids = generate(model, prompt, s.train.sample_tokens, temperature=0.8, top_k=50,
                   eos_id=data.tokenizer.eos_token_id, generator=gen)
    return data.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)






# ---------------------------------------------------------------------------------------------- a run


@dataclass
class Outcome:
    status: str  # finished | already_finished | halted
    state: TrainingState


def make_saver(out_dir: str, s: Settings, rt: Runtime) -> Callable[[nn.Module, object, TrainingState], str | None]:
    """The loop's checkpoint writer: rank 0 writes weights, training state, optimizer and RNG state. A sharded model
    and its optimizer are gathered whole to rank 0's host first (every rank takes part), so every checkpoint has
    one format, whatever wrote it and whatever resumes it."""
    def save(model: nn.Module, optimizer, state: TrainingState) -> str | None:
        if is_sharded(model):
            model, opt_state = full_model(model, rt, device="cpu"), gather_optimizer(model, optimizer, rt)
        else:
            opt_state = optimizer.state_dict() if rt.is_master else None
        if not rt.is_master:
            return None
        meta = {**state.state_dict(), "model_config": config_to_dict(model.config), "settings": s.to_dict(),
                "world_size": rt.world_size}
        return save_checkpoint(out_dir, model, {"optimizer": opt_state, "rng": torch.get_rng_state()},
                               meta, keep_periodic=s.train.keep_checkpoints)

    return save


def start_point(req: RunRequest, ckpt: Checkpoint | None, data: Data, rt: Runtime):
    """(model, stage index, training state, optimizer state): a fresh (or --init-from-hf) dense model, the
    middle of a stage, or a finished stage's model, whose successor then begins with its transition."""
    state = TrainingState()
    if ckpt is None:
        torch.manual_seed(req.settings.run.seed)
        if req.init_from_hf:
            from transfer.hf_format import from_hf

            return _placed(lambda: from_hf(req.init_from_hf), rt), 0, state, None
        return _placed(lambda: build_model(req.settings.model), rt), 0, state, None
    saved = ckpt.load_state(mmap=rt.sharded and not rt.is_master)  # sharded: rank 0's optimizer state is used
    state.load_state_dict(ckpt.meta)
    data.batches.load_state_dict(state.data_position or saved.get("batches", {}))
    torch.set_rng_state(saved["rng"])
    if rt.is_master:
        saved_by = ckpt.meta.get("world_size", 1)
        print(f"Resuming from {ckpt.path} ({state.phase}, step {state.step})" + (
            f", saved by {saved_by} process{'es' if saved_by > 1 else ''}, on {rt.world_size}"
            if saved_by != rt.world_size else ""))
    index = stage_index(state.phase)
    model = _placed(lambda: ckpt.load_model("cpu" if rt.sharded else rt.device), rt)
    return model, index + state.phase_done, state, None if state.phase_done else saved["optimizer"]


def _placed(make: Callable[[], nn.Module], rt: Runtime) -> nn.Module:
    """make()'s model on the run's device; sharded (parallel=fsdp), rank 0 alone makes it, on its host, and every
    rank gets its shards."""
    if not rt.sharded:
        return make().to(rt.device)
    return sharded_from(make() if rt.is_master else None, rt)


def run_pipeline(req: RunRequest, rt: Runtime, stop_requested: Callable[[], str | None] = lambda: None) -> Outcome:
    """Train every stage from where the run stands; a failed check or a divergence halts (printed on rank 0)."""
    started, s, out_dir = time.time(), req.settings, req.out_dir
    say = print if rt.is_master else (lambda *a, **k: None)
    rt.use_parallel(s.run.parallel)
    check_memory(req, rt)
    ckpt = latest_checkpoint(out_dir, log=say) if req.resume else None
    if ckpt is not None and ckpt.phase == stages.PIPELINE[-1].name and ckpt.meta["phase_done"]:
        say(f"Run in {out_dir} already finished (final eval loss {ckpt.meta['eval_losses'][ckpt.phase]:.4f}).")
        state = TrainingState()
        state.load_state_dict(ckpt.meta)
        return Outcome("already_finished", state)
    if req.dataset:
        data = load_prepared(s, req.dataset, out_dir, rt, req.resume)
    else:
        data = load_data(s, req.data_files, out_dir, rt, None if req.resume else req.init_from_hf, req.origin,
                         req.resume)
    log = open_metrics(req, rt, ckpt)
    run = PhaseRun(rt, s.train, data.batches, data.val_batches, log, make_saver(out_dir, s, rt), s.run.compile,
                   stop_requested, peak_flops=peak_flops_of(rt))
    model, index, state, opt_state = start_point(req, ckpt, data, rt)
    if rt.is_master:  # only once data and resume point are known good: a refused resume changes nothing
        save_settings(s, out_dir)
        write_atomic(os.path.join(out_dir, SOURCE_FILE), json.dumps(data.source, indent=1))
    log.write(**start_record(req, rt, data, state))
    try:
        status, message = _train_stages(req, rt, data, run, log, model, index, state, opt_state)
        finish(log, out_dir, rt, status, message, state, started)
    except TrainingInterrupted as e:
        finish(log, out_dir, rt, "interrupted", f"stopped by {e.signal_name}", state, started)
        raise
    finally:
        log.close()
    if rt.is_master and status == "finished":
        summary(state, time.time() - started, out_dir, log)
    return Outcome(status, state)


def open_metrics(req: RunRequest, rt: Runtime, ckpt: Checkpoint | None) -> MetricsLog:
    """metrics.jsonl (rank 0) cut back to the checkpoint resumed from, plus TensorBoard scalars when the
    tensorboard setting asks for them."""
    resume_global_step = ckpt.meta["global_step"] if ckpt else None
    sinks = []
    if rt.is_master and req.settings.run.tensorboard:
        from training.reporting.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(os.path.join(req.out_dir, "tensorboard"), purge_step=None if resume_global_step is None else resume_global_step + 1))
    return MetricsLog(os.path.join(req.out_dir, "metrics.jsonl"), resume_global_step, rt.is_master, sinks,
                      ckpt.phase if ckpt else None)


HUB_TEXT_BYTES, HUB_STORY_BYTES = 1.9e9, 900  # TinyStories' training text: 1.9 GB, ~900 bytes a story (2.12M)


def collective_timeout_for(req: RunRequest) -> timedelta:
    """The run's process-group timeout: RunConfig.collective_timeout, or (0) training.parallel.runtime's bound from
    the text rank 0 may tokenize (none for a prepared dataset), the largest stage's model, its checks' calibration
    rows (8 x seq_len, run_data.Data.calibration) and its checkpoint."""
    s = req.settings
    if s.run.collective_timeout:
        return timedelta(seconds=s.run.collective_timeout)
    if req.dataset:
        text = 0
    elif req.data_files:
        text = sum(os.path.getsize(f) for f in req.data_files if os.path.exists(f))
    else:
        text = min(HUB_TEXT_BYTES, (s.data.max_stories or HUB_TEXT_BYTES) * HUB_STORY_BYTES)
    largest = max(stages.stage_configs(s), key=parameter_count)
    return collective_timeout(int(text), parameter_count(largest), 8 * s.train.seq_len, checkpoint_bytes(largest))


def peak_flops_of(rt: Runtime) -> float | None:
    """One process's peak FLOP/s at the run's precision, for MFU: known for the GPUs training.plan lists."""
    if rt.device.type != "cuda":
        return None

    return peak_flops(torch.cuda.get_device_name(rt.device), resolve_precision(rt.precision, "cuda"))


def finish(log: MetricsLog, out_dir: str, rt: Runtime, status: str, message: str, state: TrainingState,
           started: float) -> None:
    """The outcome record, the report brought up to date, TensorBoard closed."""
    log.write(kind="outcome", status=status, message=message, global_step=state.global_step, time=time.time(),
              seconds=time.time() - started)
    write_report_quietly(out_dir, rt)


def write_report_quietly(out_dir: str, rt: Runtime) -> None:
    """report.html, rewritten (rank 0); a report that cannot be written costs a warning, never the run."""
    if not rt.is_master:
        return
    try:
        write_report(out_dir, stages.PIPELINE)
    except WriteFailed as e:
        print(f"warning: report.html not updated: {e}")


def _train_stages(req: RunRequest, rt: Runtime, data: Data, run: PhaseRun, log: MetricsLog, model: nn.Module,
                  index: int, state: TrainingState, opt_state: dict | None) -> tuple[str, str]:
    """Each stage from `index` on: its transition (grow, verify, eval the grown model), then its training.
    Returns (finished | halted, the message); `state` is updated in place."""
    s, out_dir = req.settings, req.out_dir
    say = print if rt.is_master else (lambda *a, **k: None)
    for i in range(index, len(stages.PIPELINE)):
        stage = stages.PIPELINE[i]
        if state.phase != stage.name:  # entering the stage: grow the previous stage's model, then verify it
            loss_before = state.eval_losses.get(stages.PIPELINE[i - 1].name) if i else None
            if stage.grow is not None:
                grown = transition(stage, model, data, s, rt)
                if not grown.passed:
                    log.write(**transition_record(stage, grown, state, loss_before, None, s))
                    why = f"transition {i} failed the {', '.join(grown.failed)} check(s); see the summary above."
                    halt(why, out_dir, resume_hint(out_dir, grown.failed, s), log, rt)
                    return "halted", why
                model = grown.model
            state.begin(stage.name)
            loss_after = evaluate_at_start(model, stage, state, data, log, rt)
            if stage.grow is not None:
                log.write(**transition_record(stage, grown, state, loss_before, loss_after, s))
                say(f"Eval loss before transition {i}: {loss_before:.6f}; grown model: {loss_after:.6f} "
                    f"(difference {loss_after - loss_before:+.1e})")
        phase = stage_phase(stage, s, last=i == len(stages.PIPELINE) - 1)
        say("\n" + phase_header(phase.title, phase.steps, phase.lr, str(rt.device), model))
        run.watch = clone_watch(stage, s, log, rt) if stage.measure_clones else None
        try:
            train_phase(model, phase, run, state, opt_state)
        except TrainingDiverged as e:
            why = f"{e}; lower the learning rate (--{phase.name}_lr) or raise warmup_steps."
            halt(why, out_dir, resume_command(out_dir, f"--{phase.name}_lr={phase.lr / 3:.1e}"), log, rt)
            return "halted", why
        except TrainingHalted as e:
            why = f"{e} (halt_on_relock is on; turn it off to only warn)"
            halt(why, out_dir, resume_command(out_dir, f"--{phase.name}_lr={phase.lr / 2:.1e}"), log, rt)
            return "halted", why
        opt_state = None
        whole = full_model(model, rt) if is_sharded(model) else model  # rank 0 samples from a whole copy
        if rt.is_master:
            story = sample_story(whole, data, s, rt)
            print(f"{phase.title} finished: eval loss {state.eval_losses[phase.name]:.4f}\nSample: {story}")
            log.write(kind="sample", phase=phase.name, global_step=state.global_step, time=time.time(),
                      prompt=SAMPLE_PROMPT, text=story)
        write_report_quietly(out_dir, rt)
    return "finished", f"{len(stages.PIPELINE)} phases trained, {sum(st.grow is not None for st in stages.PIPELINE)} transitions verified"


def evaluate_at_start(model: nn.Module, stage: Stage, state: TrainingState, data: Data, log: MetricsLog,
                      rt: Runtime) -> float:
    """The eval at a stage's step 0 (before phase 1 trains; right after a transition): the curve's first point,
    which for a grown model must equal the previous stage's last eval."""
    loss, routing = evaluate_details(model, data.val_batches, rt)
    extra = {"routing": routing} if routing is not None else {}
    log.write(kind="eval", phase=stage.name, step=0, global_step=state.global_step, loss=loss, time=time.time(),
              **state.progress(data.train_tokens), **extra)
    return loss


def start_record(req: RunRequest, rt: Runtime, data: Data, state: TrainingState) -> dict:
    """The metrics record of a (re)start: where, on what, with which settings (and the preset's, to compare)."""
    preset = None if req.preset is None else build_settings(req.preset).to_dict()
    return dict(kind="start", global_step=state.global_step, time=time.time(), preset=req.preset,
                device=str(rt.device), world_size=rt.world_size,
                precision=resolve_precision(req.settings.run.precision, rt.device.type), data=data.description,
                train_tokens=data.train_tokens, val_tokens=data.val_tokens, settings=req.settings.to_dict(),
                preset_settings=preset, resumed=req.resume)




def clone_watch(stage: Stage, s: Settings, log: MetricsLog, rt: Runtime):
    """The loop's watch for a stage grown by width: at each eval, measure clone divergence (logged in the eval
    record), judge the stage's history so far (resumed runs: read back from metrics.jsonl), warn, and halt
    when halt_on_relock is set. The halt is decided on rank 0 and shared, so every rank stops together."""
    history = [r["clone_divergence"] for r in log.records() if r.get("phase") == stage.name and "clone_divergence" in r]

    def watch(model: nn.Module, state: TrainingState) -> tuple[dict, str | None]:
        whole = full_model(model, rt) if is_sharded(model) else model  # sharded: measured on rank 0 alone
        record = stage.measure_clones(whole, s) if whole is not None else {}
        verdict = judge_clone_divergence(history + [record]) if record else None
        if record:
            history.append(record)
            if not verdict.passed and rt.is_master:
                print(f"⚠ WARNING at {stage.name} step {state.step}: {verdict.message}")
        halting = rt.broadcast_flag(verdict is not None and not verdict.passed and s.growth.halt_on_relock)
        reason = (verdict.message if verdict else "cloned units re-locked (rank 0's verdict)") if halting else None
        return ({"clone_divergence": record} if record else {}), reason

    return watch


# ------------------------------------------------------------------------------------------- telling







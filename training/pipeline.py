"""The orchestration that trains and grows through the stage table (training/stages.py), described once there:

    PIPELINE = (dense, moe, grown)   # each Stage: its name, how it is grown from the previous stage, its check

A stage with `grow` begins with a transition: the previous stage's trained model is grown into this stage's,
and `check` verifies the pair on rank 0 before any training. A stage named X trains for TrainConfig.X_steps at
peak LR TrainConfig.X_lr; with decay=final_phase only the last stage decays its LR. Checkpoint names, metrics
records, the summary, the plots and the growth benchmark's arms all derive from this table: a fourth stage (a
second growth, say) is one entry here plus its two settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from config import ConfigError, config_to_dict
from data import DataError, eval_batches, load_corpus, load_tokenizer, save_tokenizer, tokenize_to_cache
from data import train_tokenizer
from data.source import SOURCE_FILE, source_record
from data.tokens import cache_bytes
from models import build_model, generate
from training.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from common.files import NotEnoughSpace, WriteFailed, check_free_space, dir_bytes, write_atomic
from training.disk import checkpoint_bytes, peak_checkpoint_bytes
from training.loop import (Phase, PhaseRun, TrainingDiverged, TrainingHalted, TrainingInterrupted, TrainingState,
                           evaluate_details, train_phase)
from training.html_report import write_report
from training.report import BAR, MetricsLog, phase_header, plot_losses
from training.runtime import Runtime, resolve_precision
from training.sharding import StepBatches, full_model, gather_optimizer, is_sharded, sharded_from
from training.settings import Settings, build_settings, save_settings
from training.plan import Plan, estimate_tokens, fit_settings, make_plan, peak_flops
from training import stages
from training.stages import Stage, stage_configs, stage_index
from transfer import judge_clone_divergence


def stage_phase(stage: Stage, s: Settings, last: bool) -> Phase:
    """What the loop trains in a stage: its steps and LR from the settings, decaying in the last stage (or in
    every stage with decay=every_phase)."""
    tc = s.train
    return Phase(stage.name, stage.title, getattr(tc, f"{stage.name}_steps"), getattr(tc, f"{stage.name}_lr"),
                 decays=last or tc.decay == "every_phase")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    batches: StepBatches
    val_batches: list
    tokenizer: object  # None on ranks other than 0 with a prepared dataset (only rank 0 samples)
    calibration: torch.Tensor  # (B, T) validation tokens for router centring and the checks
    source: dict  # what was read, for data_source.json (data.source)
    description: str = ""  # one line: where the text came from
    val_tokens: int = 0  # tokens in the validation split

    @property
    def train_tokens(self) -> int:
        return len(self.batches.tokens)


def load_data(s: Settings, data_files: list[str] | None, out_dir: str, rt: Runtime, hf_path: str | None = None,
              origin: str = "auto", resume: bool = False) -> Data:
    """Corpus -> tokenizer (trained once, kept beside the checkpoints) -> cached token arrays -> batches."""
    log = print if rt.is_master else (lambda _: None)
    corpus = load_corpus(data_files, s.data.val_fraction, s.data.max_stories or None, s.run.seed,
                         offline_stories=s.data.offline_stories, log=log, origin=origin)
    log(f"Data: {corpus.source}; {len(corpus.train):,} training / {len(corpus.val):,} validation stories")
    tok_dir, cache = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "cache")
    error = None
    if rt.is_master:  # the other ranks read what rank 0 writes, once it says that worked
        try:
            _ensure_tokenizer(tok_dir, corpus.train, s.model.vocab_size, hf_path, resume)
            tokenizer = load_tokenizer(tok_dir)
            check_free_space(out_dir, disk_needs(s, corpus, tokenizer), dir_bytes(out_dir) if resume else 0)
            tokenize_to_cache(corpus.train, tokenizer, cache)
            tokenize_to_cache(corpus.val, tokenizer, cache)
        except (DataError, NotEnoughSpace, WriteFailed) as e:
            error = e
    if not rt.broadcast_flag(error is None):
        raise error or DataError("rank 0 could not prepare the data; see its message")
    tokenizer = load_tokenizer(tok_dir)
    train_tokens = tokenize_to_cache(corpus.train, tokenizer, cache)
    val_tokens = tokenize_to_cache(corpus.val, tokenizer, cache)
    log(f"Tokens: {len(train_tokens):,} training / {len(val_tokens):,} validation (vocab {len(tokenizer):,})")
    tc = s.train
    batches = StepBatches(train_tokens, tc.batch_size, tc.seq_len, s.run.seed, rt.rank, rt.world_size,
                          tc.grad_accum_steps)
    val = eval_batches(val_tokens, tc.batch_size, tc.seq_len, tc.eval_batches)
    return Data(batches, val, tokenizer, val[0][0][:8], source_record(corpus.origin, data_files), corpus.source,
                len(val_tokens))


def load_prepared(s: Settings, path: str, out_dir: str, rt: Runtime, resume: bool) -> Data:
    """A dataset prepared once (prepare_data.py): its tokens memory-mapped in place, its tokenizer copied into the
    run (so the run directory stays whole for sampling and export). Start-up reads no text."""
    from data.prepared import open_prepared

    log = print if rt.is_master else (lambda _: None)
    prepared = open_prepared(path)
    tok_dir, error = os.path.join(out_dir, "tokenizer"), None
    if rt.is_master:
        try:
            ckpts = [checkpoint_bytes(c) for c in stage_configs(s)]
            need = {"checkpoints": peak_checkpoint_bytes(ckpts, s.train.keep_checkpoints), "tokenizer, logs": 2 << 20}
            check_free_space(out_dir, need, dir_bytes(out_dir) if resume else 0)
            if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
                save_tokenizer(prepared.tokenizer, tok_dir)
        except (NotEnoughSpace, WriteFailed) as e:
            error = e
    if not rt.broadcast_flag(error is None):
        raise error or DataError("rank 0 could not prepare the run directory; see its message")
    log(f"Data: {prepared.describe()}")
    train_tokens, val_tokens = prepared.train_tokens, prepared.val_tokens
    log(f"Tokens: {len(train_tokens):,} training / {len(val_tokens):,} validation (vocab {prepared.vocab_size:,})")
    tc = s.train
    batches = StepBatches(train_tokens, tc.batch_size, tc.seq_len, s.run.seed, rt.rank, rt.world_size,
                          tc.grad_accum_steps)
    val = eval_batches(val_tokens, tc.batch_size, tc.seq_len, tc.eval_batches)
    tokenizer = prepared.tokenizer if rt.is_master else None  # rank 0 alone samples: the others skip its import
    return Data(batches, val, tokenizer, val[0][0][:8], prepared.source_record(), prepared.describe(), len(val_tokens))


# ------------------------------------------------------------------------------------------- the plan
def plan_device(s: Settings, preset: str | None) -> tuple[str, str | None]:
    """(device type, GPU name) a plan is for: the visible GPU; a cuda run planned where none is visible assumes
    training.plan.REFERENCE_GPU (gpu name None)."""
    if s.run.device.startswith("cuda") or (s.run.device == "auto" and torch.cuda.is_available()):
        return "cuda", torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return ("cuda", None) if preset == "cuda" else ("cpu", None)


def planned_train_tokens(req: "RunRequest") -> int | None:
    """Training tokens, where known without reading the text: a prepared dataset's count, or local files' size
    times the measured tokens per byte of TinyStories at this vocabulary; None for the hub."""
    if req.dataset:
        from data.prepared import open_prepared

        return len(open_prepared(req.dataset).train_tokens)
    if req.data_files:

        n_bytes = sum(os.path.getsize(f) for f in req.data_files)
        return round(estimate_tokens(n_bytes, req.settings.model.vocab_size) * (1 - req.settings.data.val_fraction))
    return None


def run_plan(req: "RunRequest", world_size: int | None = None) -> Plan:
    """The plan of the run req asks for (training.plan), on the device it will use; nothing is built or read."""

    device_type, gpu_name = plan_device(req.settings, req.preset)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    return make_plan(req.settings, device_type=device_type, gpu_name=gpu_name, world_size=world,
                     train_tokens=planned_train_tokens(req))


def check_memory(req: "RunRequest", rt: Runtime) -> None:
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


def disk_needs(s: Settings, corpus, tokenizer) -> dict[str, int]:
    """Bytes the run will write: the most checkpoints held at once, the token caches, the small files."""
    ckpts = [checkpoint_bytes(c) for c in stage_configs(s)]
    return {"checkpoints": peak_checkpoint_bytes(ckpts, s.train.keep_checkpoints),
            "token cache": cache_bytes(corpus.train, tokenizer) + cache_bytes(corpus.val, tokenizer),
            "tokenizer, logs, plot": 2 << 20}


TOKENIZER_KEY = "trained_on.sha256"  # beside tokenizer.json: the text and vocabulary it was trained for


def _tokenizer_key(stories: list[str], vocab_size: int, hf_path: str | None) -> str:
    h = hashlib.sha256(f"vocab {vocab_size}\nfrom {os.path.abspath(hf_path) if hf_path else 'training text'}\n".encode())
    for story in stories:
        data = story.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _ensure_tokenizer(tok_dir: str, stories: list[str], vocab_size: int, hf_path: str | None, resume: bool) -> None:
    """The tokenizer for exactly this text and vocabulary: reused when its key matches, else trained anew (a
    fresh start never inherits a failed start's tokenizer); a resumed run whose tokenizer does not match is
    refused. A model brought in with --init-from-hf keeps its own tokenizer."""
    key, key_path = _tokenizer_key(stories, vocab_size, hf_path), os.path.join(tok_dir, TOKENIZER_KEY)
    have = os.path.exists(os.path.join(tok_dir, "tokenizer.json"))
    found = open(key_path).read().strip() if os.path.exists(key_path) else None
    if have and (found == key or (resume and found is None)):  # None: a run saved before tokenizers were keyed
        return
    if have and resume:
        raise DataError(f"{tok_dir} was trained on other text or another vocabulary than this resume reads; "
                        "resume with the run's own data and settings, or start a new run")
    save_tokenizer(load_tokenizer(hf_path) if hf_path else train_tokenizer(stories, vocab_size), tok_dir)
    write_atomic(key_path, key + "\n")


SAMPLE_PROMPT = "Once upon a time"


def sample_story(model: nn.Module, data: Data, s: Settings, rt: Runtime) -> str:
    prompt = torch.tensor([data.tokenizer.encode(SAMPLE_PROMPT)], device=rt.device)
    gen = torch.Generator().manual_seed(s.run.seed)
    ids = generate(model, prompt, s.train.sample_tokens, temperature=0.8, top_k=50,
                   eos_id=data.tokenizer.eos_token_id, generator=gen)
    return data.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------- transitions
@dataclass
class TransitionResult:
    model: nn.Module
    passed: bool  # the same on every rank
    failed: list[str]  # names of the failed checks (rank 0)
    results: dict | None = None  # check name -> CheckResult (rank 0)
    title: str = ""


def transition(stage: Stage, model: nn.Module, data: Data, s: Settings, rt: Runtime) -> TransitionResult:
    """Grow the previous stage's model into stage's and verify the pair on rank 0. A sharded model is gathered whole
    to rank 0, grown and checked there, and the grown model sharded from it on every rank."""
    calib = data.calibration.to(rt.device)
    sharded = is_sharded(model)
    raw = full_model(model, rt) if sharded else model.to(rt.device)
    new = stage.grow(raw, s, calib) if raw is not None else None  # rank 0 alone when sharded
    passed, failed, results = True, [], None
    if rt.is_master:
        print(f"\n{BAR}\nTRANSITION {stage_index(stage.name)}: {stage.describe(s)}\n{BAR}")
        report = stage.check(raw, new, calib)
        passed, failed, results = report.passed, [k for k, r in report.results.items() if not r.passed], report.results
    passed = rt.broadcast_flag(passed)
    if sharded:
        del raw
        new = sharded_from(new, rt) if passed else model
    return TransitionResult(new, passed, failed, results, stage.describe(s))


# ---------------------------------------------------------------------------------------------- a run
@dataclass
class RunRequest:
    """What the command line asks for, validated."""

    settings: Settings
    out_dir: str
    data_files: list[str] | None = None
    resume: bool = False
    init_from_hf: str | None = None  # a fresh run's phase-1 model and tokenizer
    origin: str = "auto"  # the data source a resume must read again (data.source.resume_source)
    preset: str | None = None  # the preset a fresh run started from (the report shows settings that differ)
    dataset: str | None = None  # a prepared dataset directory (data.prepared), instead of data_files or the hub


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
        from training.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(os.path.join(req.out_dir, "tensorboard"), purge_step=None if resume_global_step is None else resume_global_step + 1))
    return MetricsLog(os.path.join(req.out_dir, "metrics.jsonl"), resume_global_step, rt.is_master, sinks,
                      ckpt.phase if ckpt else None)


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
                    log.write(**transition_record(stage, grown, state, loss_before, None))
                    why = f"transition {i} failed the {', '.join(grown.failed)} check(s); see the summary above."
                    halt(why, out_dir, resume_hint(out_dir, grown.failed, s), log, rt)
                    return "halted", why
                model = grown.model
            state.begin(stage.name)
            loss_after = evaluate_at_start(model, stage, state, data, log, rt)
            if stage.grow is not None:
                log.write(**transition_record(stage, grown, state, loss_before, loss_after))
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


def transition_record(stage: Stage, result: "TransitionResult", state: TrainingState, loss_before: float | None,
                      loss_after: float | None) -> dict:
    """The metrics record of a transition: every check's verdict, and the eval loss on either side."""
    checks = {k: r.to_record() for k, r in result.results.items()} if result.results else {}
    return dict(kind="transition", index=stage_index(stage.name), stage=stage.name, title=result.title,
                global_step=state.global_step, time=time.time(), **state.progress(None), passed=result.passed,
                loss_before=loss_before, loss_after=loss_after, checks=checks)


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
def resume_command(out_dir: str, *settings: str) -> str:
    """The command that continues the run in out_dir, with the settings given (e.g. "--noise_std=0.3")."""
    return " ".join(["python train_tinystories.py --out-dir", out_dir, "--resume", *settings])


def resume_hint(out_dir: str, failed: list[str], s: Settings) -> str:
    """The exact command to resume after the fix; knobs the user can turn are filled in."""
    if "symmetry" in failed:
        return resume_command(out_dir, f"--noise_std={max(0.3, 2 * s.growth.noise_std):g}")
    return resume_command(out_dir)


def halt(why: str, out_dir: str, hint: str, log: MetricsLog, rt: Runtime) -> None:
    """The diagnosis, the last good checkpoint and the command to resume (printed by rank 0)."""
    if rt.is_master:
        print(f"\n✗ HALTED: {why}")
        last = latest_checkpoint(out_dir)
        if last is not None:
            print(f"Last good checkpoint: {last.path} ({last.phase}, step {last.meta['step']}"
                  f"{', end of phase' if last.meta.get('phase_done') else ''}). Nothing trained is lost.")
        print(f"After fixing, resume with:\n  {hint}")
        plot_losses(log.records(), os.path.join(out_dir, "loss_curve.png"), stages.PIPELINE)


def summary(state: TrainingState, seconds: float, out_dir: str, log: MetricsLog) -> None:
    png = plot_losses(log.records(), os.path.join(out_dir, "loss_curve.png"), stages.PIPELINE)
    print(f"\n{BAR}\nTRAINING SUMMARY\n{BAR}")
    previous = None
    for stage in stages.PIPELINE:
        if stage.name in state.eval_losses:
            loss = state.eval_losses[stage.name]
            delta = f"  ({loss - previous:+.4f})" if previous is not None else ""
            print(f"  {stage.label:<20} eval loss {loss:.4f}{delta}")
            previous = loss
    n = sum(1 for st in stages.PIPELINE if st.grow is not None)
    print(f"  {n} transitions verified. ✓ ALL CHECKS PASSED\n  Time: {seconds / 60:.1f} min")
    print(f"  Outputs in {out_dir}: report.html, metrics.jsonl, {os.path.basename(png or '')}, checkpoints/, "
          f"tokenizer/\n{BAR}")

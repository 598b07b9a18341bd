"""Train a small LM on TinyStories in three phases, verifying growth at every transition.

    python train_tinystories.py                          # preset by device: cuda, else cpu (about 15 min)
    python train_tinystories.py --preset micro           # smallest run that exercises everything (< 2 min)
    python train_tinystories.py --data-files ../shared/data/tinystories/train.txt --noise_std=0.2
    python train_tinystories.py --out-dir runs/x --resume
    torchrun --nproc_per_node=2 train_tinystories.py --preset micro     # DDP (gloo on CPU, NCCL on GPU)

Phase 1 trains a dense model; transition 1 upcycles it into an MoE (dense_to_moe) and checks functional
equivalence and routing; phase 2 trains the MoE; transition 2 grows it (scale_bilaterally) and runs all four
checks (detailed_growth_check); phase 3 trains the grown MoE. A failed check halts the run with exit code 1,
its diagnosis and the command to resume from the last good checkpoint. Exit code 2: bad input, before any work.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, replace

import torch

from config import ConfigError, config_to_dict
from data import DataError, TokenBatches, check_files, eval_batches, load_corpus, load_tokenizer, save_tokenizer
from data import tokenize_to_cache, train_tokenizer
from models import build_model, generate
from training.checkpoint import PHASES, Checkpoint, CheckpointError, latest_checkpoint, save_checkpoint
from training.loop import Phase, PhaseRun, TrainingDiverged, TrainingInterrupted, train_phase
from training.report import BAR, MetricsLog, phase_header, plot_losses
from training.runtime import Runtime, setup_runtime, teardown_runtime
from training.settings import (Settings, build_settings, check_consistency, default_preset, load_saved_settings,
                               save_settings)
from transfer import dense_to_moe, detailed_growth_check, scale_bilaterally, upcycling_check



@dataclass
class Data:
    batches: TokenBatches
    val_batches: list
    tokenizer: object
    calibration: torch.Tensor  # (B, T) validation tokens for router centring and the checks


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description="Three-phase growth-verified training on TinyStories.",
                                epilog="Any config.py field can be set as --name=value, e.g. --noise_std=0.2")
    p.add_argument("--preset", help="micro | cpu | cuda (default: cuda if available, else cpu)")
    p.add_argument("--data-files", nargs="+", help="local TinyStories .txt (<|endoftext|> separated) or .json/.jsonl")
    p.add_argument("--out-dir", help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    p.add_argument("--seed", type=int, help="random seed (same as --seed=N)")
    p.add_argument("--init-from-hf", metavar="PATH", help="start phase 1 from a Llama-architecture transformers "
                   "checkpoint on disk (its weights and tokenizer) instead of a fresh model")
    args, rest = p.parse_known_args(argv)
    if args.seed is not None:
        rest.append(f"--seed={args.seed}")
    return args, rest


def resolve_settings(args: argparse.Namespace, overrides: list[str]) -> tuple[Settings, str]:
    """Settings and out_dir, or ConfigError for any bad input (before any work)."""
    preset = args.preset or default_preset()
    out_dir = args.out_dir or os.path.join("runs", preset)
    saved = load_saved_settings(out_dir) if args.resume else None
    if args.resume and saved is None:
        raise ConfigError(f"--resume: {out_dir} holds no run (no settings.json); drop --resume to start one")
    if not args.resume and latest_checkpoint(out_dir, log=lambda _: None) is not None:
        raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out-dir")
    settings = build_settings(None if saved else preset, overrides, saved)
    if args.init_from_hf and not args.resume:
        settings = with_hf_model(settings, args.init_from_hf, overrides)
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")  # per process: torchrun ranks probe at once
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to --out-dir {out_dir}: {e.strerror}; choose a writable directory") from None
    return settings, out_dir


def with_hf_model(s: Settings, path: str, overrides: list[str]) -> Settings:
    """Settings whose phase-1 model is the transformers checkpoint's (ConfigError if it cannot be used)."""
    from transfer.hf_format import UnsupportedModel, read_hf_config

    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"--init-from-hf {path}: not a transformers model directory (no config.json)")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise ConfigError(f"--init-from-hf {path}: no tokenizer.json beside the model; save its fast tokenizer there")
    model_fields = set(config_to_dict(s.model)) - {"n_experts", "top_k"}
    clash = [a for a in overrides if a[2:].split("=", 1)[0] in model_fields]
    if clash:
        raise ConfigError(f"{' '.join(clash)}: the model comes from --init-from-hf and cannot be changed")
    try:
        cfg = read_hf_config(path)
    except (UnsupportedModel, OSError, ValueError) as e:
        raise ConfigError(f"--init-from-hf {path}: {e}") from None
    if cfg.is_moe:
        raise ConfigError(f"--init-from-hf {path}: a Mixtral (MoE) model; phase 1 needs a dense Llama model")
    settings = replace(s, model=cfg)
    if settings.train.seq_len > cfg.max_seq_len:
        settings = replace(settings, train=replace(settings.train, seq_len=cfg.max_seq_len))
    check_consistency(settings)
    return settings


def load_data(s: Settings, data_files: list[str] | None, out_dir: str, rt: Runtime,
              hf_path: str | None = None) -> Data:
    """Corpus -> tokenizer (trained once, kept beside the checkpoints) -> cached token arrays -> batches."""
    log = print if rt.is_master else (lambda _: None)
    corpus = load_corpus(data_files, s.data.val_fraction, s.data.max_stories or None, s.run.seed,
                         offline_stories=s.data.offline_stories, log=log)
    log(f"Data: {corpus.source}; {len(corpus.train):,} training / {len(corpus.val):,} validation stories")
    tok_dir, cache = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "cache")
    if rt.is_master:
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            # A model brought in with --init-from-hf keeps its own tokenizer; otherwise train one on the text.
            tokenizer = load_tokenizer(hf_path) if hf_path else train_tokenizer(corpus.train, s.model.vocab_size)
            save_tokenizer(tokenizer, tok_dir)
        tokenize_to_cache(corpus.train, load_tokenizer(tok_dir), cache)
        tokenize_to_cache(corpus.val, load_tokenizer(tok_dir), cache)
    rt.barrier()
    tokenizer = load_tokenizer(tok_dir)
    train_tokens = tokenize_to_cache(corpus.train, tokenizer, cache)
    val_tokens = tokenize_to_cache(corpus.val, tokenizer, cache)
    log(f"Tokens: {len(train_tokens):,} training / {len(val_tokens):,} validation (vocab {len(tokenizer):,})")
    tc = s.train
    batches = TokenBatches(train_tokens, tc.batch_size, tc.seq_len, s.run.seed, rt.rank, rt.world_size)
    val = eval_batches(val_tokens, tc.batch_size, tc.seq_len, tc.eval_batches)
    return Data(batches, val, tokenizer, val[0][0][:8])


def sample_story(model: torch.nn.Module, data: Data, s: Settings, rt: Runtime) -> str:
    prompt = torch.tensor([data.tokenizer.encode("Once upon a time")], device=rt.device)
    gen = torch.Generator().manual_seed(s.run.seed)
    ids = generate(model, prompt, s.train.sample_tokens, temperature=0.8, top_k=50,
                   eos_id=data.tokenizer.eos_token_id, generator=gen)
    return data.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)


def transition(index: int, model: torch.nn.Module, data: Data, s: Settings, rt: Runtime):
    """Grow model into the next phase's and verify it on rank 0: (new model, passed, failed check names, fix args)."""
    g, calib = s.growth, data.calibration.to(rt.device)
    raw = model.to(rt.device)
    if index == 1:
        new = dense_to_moe(raw, g.n_experts, g.top_k, s.run.seed, g.router_init_std, calibration_tokens=calib)
        title = f"TRANSITION 1: dense -> MoE ({g.n_experts} experts, top-{g.top_k})"
    else:
        new = scale_bilaterally(raw, g.scale_factor, g.extra_layers, g.noise_std, s.run.seed, calibration_tokens=calib)
        title = f"TRANSITION 2: bilateral growth (width x{g.scale_factor}, +{g.extra_layers} layers, noise_std {g.noise_std})"
    passed, failed = True, []
    if rt.is_master:
        print(f"\n{BAR}\n{title}\n{BAR}")
        report = upcycling_check(raw, new, calib) if index == 1 else detailed_growth_check(raw, new, calib)
        passed = report.passed
        failed = [k for k, r in report.results.items() if not r.passed]
    return new, rt.broadcast_flag(passed), failed


def resume_hint(out_dir: str, failed: list[str], s: Settings) -> str:
    """The exact command to resume after the fix; knobs the user can turn are filled in."""
    extra = ""
    if "symmetry" in failed:
        extra = f" --noise_std={max(0.3, 2 * s.growth.noise_std):g}"
    return f"python train_tinystories.py --out-dir {out_dir} --resume{extra}"


def halt(why: str, out_dir: str, hint: str, log: MetricsLog, rt: Runtime) -> int:
    """Exit code 1 with the diagnosis, the last good checkpoint and the command to resume (printed by rank 0)."""
    if rt.is_master:
        print(f"\n✗ HALTED: {why}")
        last = latest_checkpoint(out_dir)
        if last is not None:
            print(f"Last good checkpoint: {last.path} ({last.phase}, step {last.meta['step']}"
                  f"{', end of phase' if last.meta.get('phase_done') else ''}). Nothing trained is lost.")
        print(f"After fixing, resume with:\n  {hint}")
        plot_losses(log.records(), os.path.join(out_dir, "loss_curve.png"))
    return 1


def pipeline_phases(tc) -> list[Phase]:
    """The three phases; with decay=final_phase only phase 3 decays its LR."""
    held = tc.decay == "final_phase"
    return [Phase("dense", "Phase 1: dense", tc.dense_steps, tc.dense_lr, decays=not held),
            Phase("moe", "Phase 2: MoE (upcycled)", tc.moe_steps, tc.moe_lr, decays=not held),
            Phase("grown", "Phase 3: grown MoE", tc.grown_steps, tc.grown_lr)]


def make_saver(out_dir: str, s: Settings, data: Data, rt: Runtime, evals: dict):
    """The loop's checkpoint callback: rank 0 writes weights, optimizer, data position and RNG state."""
    def save(model, optimizer, phase: Phase, step: int, done: bool, eval_loss: float, global_step: int):
        if done:
            evals[phase.name] = eval_loss
        if not rt.is_master:
            return None
        state = {"optimizer": optimizer.state_dict(), "batches": data.batches.state_dict(),
                 "rng": torch.get_rng_state()}
        meta = {"phase": phase.name, "step": step, "phase_done": done, "global_step": global_step,
                "model_config": config_to_dict(model.config), "eval_losses": dict(evals), "settings": s.to_dict()}
        return save_checkpoint(out_dir, model, state, meta)

    return save


def start_point(ckpt: Checkpoint | None, s: Settings, data: Data, rt: Runtime, hf_path: str | None = None):
    """(model, phase index, step within it, optimizer state): a fresh (or --init-from-hf) dense model, the middle
    of a phase, or the model of a finished phase, whose successor then begins with its transition."""
    if ckpt is None:
        torch.manual_seed(s.run.seed)
        if hf_path:
            from transfer.hf_format import from_hf

            return from_hf(hf_path).to(rt.device), 0, 0, None
        return build_model(s.model).to(rt.device), 0, 0, None
    state = ckpt.load_state()
    data.batches.load_state_dict({**state["batches"], "rank": rt.rank})
    torch.set_rng_state(state["rng"])
    if rt.is_master:
        print(f"Resuming from {ckpt.path} ({ckpt.phase}, step {ckpt.meta['step']})")
    index = PHASES.index(ckpt.phase)
    if ckpt.meta["phase_done"]:
        return ckpt.load_model(rt.device), index + 1, 0, None
    return ckpt.load_model(rt.device), index, ckpt.meta["step"], state["optimizer"]


def run(args: argparse.Namespace, s: Settings, out_dir: str, rt: Runtime, stop: "StopSignals | None" = None) -> int:
    started = time.time()
    say = print if rt.is_master else (lambda *a, **k: None)
    ckpt = latest_checkpoint(out_dir, log=say) if args.resume else None
    if ckpt is not None and ckpt.phase == "grown" and ckpt.meta["phase_done"]:
        say(f"Run in {out_dir} already finished (final eval loss {ckpt.meta['eval_losses'].get('grown'):.4f}).")
        return 0
    data = load_data(s, args.data_files, out_dir, rt, None if args.resume else args.init_from_hf)
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), ckpt.meta["global_step"] if ckpt else None, rt.is_master)
    evals = dict(ckpt.meta["eval_losses"]) if ckpt else {}
    run = PhaseRun(rt, s.train, data.batches, data.val_batches, log, make_saver(out_dir, s, data, rt, evals),
                   ckpt.meta["global_step"] if ckpt else 0, s.run.compile,
                   (lambda: stop.received) if stop else (lambda: None))
    tc = s.train
    phases = pipeline_phases(tc)
    model, index, start_step, opt_state = start_point(ckpt, s, data, rt, None if args.resume else args.init_from_hf)
    if rt.is_master:  # only once data and resume point are known good: a refused resume changes nothing
        save_settings(s, out_dir)
    for i in range(index, 3):
        if i > 0 and start_step == 0:  # a phase that starts from the previous one's model: grow, then verify
            model, passed, failed = transition(i, model, data, s, rt)
            if not passed:
                return halt(f"transition {i} failed the {', '.join(failed)} check(s); see the summary above.",
                            out_dir, resume_hint(out_dir, failed, s), log, rt)
        phase = phases[i]
        say("\n" + phase_header(phase.title, phase.steps, phase.lr, str(rt.device), model))
        try:
            train_phase(model, phase, run, start_step, opt_state)
        except TrainingDiverged as e:
            return halt(f"{e}; lower the learning rate (--{phase.name}_lr) or raise warmup_steps.", out_dir,
                        f"python train_tinystories.py --out-dir {out_dir} --resume --{phase.name}_lr={phase.lr / 3:.1e}",
                        log, rt)
        start_step, opt_state = 0, None
        if rt.is_master:
            print(f"{phase.title} finished: eval loss {evals[phase.name]:.4f}\nSample: {sample_story(model, data, s, rt)}")
    if rt.is_master:
        summary(evals, time.time() - started, out_dir, log)
    return 0


def summary(evals: dict, seconds: float, out_dir: str, log: MetricsLog) -> None:
    png = plot_losses(log.records(), os.path.join(out_dir, "loss_curve.png"))
    print(f"\n{BAR}\nTRAINING SUMMARY\n{BAR}")
    names = {"dense": "Phase 1 dense", "moe": "Phase 2 MoE", "grown": "Phase 3 grown MoE"}
    previous = None
    for name, label in names.items():
        if name in evals:
            delta = f"  ({evals[name] - previous:+.4f})" if previous is not None else ""
            print(f"  {label:<18} eval loss {evals[name]:.4f}{delta}")
            previous = evals[name]
    print(f"  Both transitions verified. ✓ ALL CHECKS PASSED\n  Time: {seconds / 60:.1f} min")
    print(f"  Outputs in {out_dir}: metrics.jsonl, {os.path.basename(png or '')}, checkpoints/, tokenizer/\n{BAR}")


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the training loop reads between steps (it then saves and stops)."""

    def __init__(self):
        self.received: str | None = None

    def __enter__(self) -> "StopSignals":
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.received:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    try:
        settings, out_dir = resolve_settings(args, overrides)
        if args.data_files is not None:
            check_files(args.data_files)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rt = setup_runtime(settings.run.device)
    try:
        with StopSignals() as stop:
            return run(args, settings, out_dir, rt, stop)
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if rt.is_master:
            where = f"checkpoint saved: {e.checkpoint}" if e.checkpoint else "nothing new to save since the last checkpoint"
            print(f"\nStopped by {e.signal_name}; {where}.\nResume with:\n  python train_tinystories.py "
                  f"--out-dir {out_dir} --resume")
        return 130 if e.signal_name == "SIGINT" else 143
    finally:
        teardown_runtime(rt)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

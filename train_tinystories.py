"""Train a small LM on TinyStories in three phases, verifying growth at every transition.

    python train_tinystories.py                          # preset by device: cuda, else cpu
    python train_tinystories.py --preset micro           # smallest run that exercises everything (seconds)
    python train_tinystories.py --data-files ../shared/data/tinystories/train.txt --noise-std 0.2
    python train_tinystories.py --out-dir runs/x --resume
    python train_tinystories.py --help                   # every setting, its default and what it does
    torchrun --nproc_per_node=2 train_tinystories.py --preset micro     # DDP (gloo on CPU, NCCL on GPU)

The stages are training/stages.py's PIPELINE: phase 1 trains a dense model; transition 1 upcycles it into an
MoE and checks functional equivalence and routing; phase 2 trains the MoE; transition 2 grows it (width and
depth) and runs every check; phase 3 trains the grown MoE. Exit codes: 0 done, 1 halted (a failed check or a
divergence: the diagnosis and the command to resume are printed), 2 bad input (before any work), 130/143
stopped by SIGINT/SIGTERM after saving.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import replace

import torch

from config import ConfigError
from data import DataError, check_files
from data.prepared import resume_prepared
from data.source import load_source, resume_source
from training.run_state.checkpoint import CheckpointError, latest_checkpoint
from common.files import NotEnoughSpace, WriteFailed, existing_ancestor
from training.run_state.disk import remove_stale_temporaries
from training.loop import TrainingInterrupted
from training.messages import resume_command
from training.pipeline import collective_timeout_for, run_pipeline
from training.plan import run_plan
from training.run_state.lock import RunLock, RunLocked, acquire, refuse_if_held
from training.parallel.runtime import (CollectiveTimeout, StopSignals, resolve_device, setup_runtime,
                                       teardown_runtime)
from training.settings import (RunRequest, build_settings, default_preset, load_saved_settings, make_parser,
                               parse_command_line, with_hf_model)

EXIT = {"finished": 0, "already_finished": 0, "halted": 1}


def parse(argv: list[str]) -> tuple[RunRequest, bool]:
    """The validated request and whether only its plan is asked for; ConfigError / DataError for any bad input
    (before any work)."""
    p = make_parser(__doc__.split("\n")[0],
                    epilog="Settings follow; e.g. --noise-std=0.2, --noise_std 0.2 or --growth.noise_std=0.2")
    p.add_argument("--preset", help="micro | cpu | cuda (default: cuda if available, else cpu)")
    p.add_argument("--data-files", nargs="+", help="local TinyStories .txt (<|endoftext|> separated) or .json/.jsonl")
    p.add_argument("--dataset", metavar="DIR", help="a dataset prepared once by prepare_data.py: memory-mapped tokens "
                   "and their tokenizer (vocab_size follows it)")
    p.add_argument("--plan", action="store_true", help="print the run's plan (parameters, tokens, FLOPs, epochs, "
                   "memory, checkpoint size, time) and exit without training")
    p.add_argument("--out-dir", help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    p.add_argument("--init-from-hf", metavar="PATH", help="start phase 1 from a Llama-architecture transformers "
                   "checkpoint on disk (its weights and tokenizer) instead of a fresh model")
    args, overrides = parse_command_line(p, argv)
    preset = args.preset or default_preset()
    out_dir = args.out_dir or os.path.join("runs", preset)
    saved = load_saved_settings(out_dir) if args.resume else None
    if args.resume and saved is None:
        raise ConfigError(f"--resume: {out_dir} holds no run (no settings.json); drop --resume to start one")
    if not args.plan:
        refuse_if_held(out_dir)  # a running run's directory: name it, whatever it holds so far
    if not args.resume and not args.plan and latest_checkpoint(out_dir, log=lambda _: None) is not None:
        raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out-dir")
    if settings_asks_tensorboard(overrides, saved) and importlib.util.find_spec("tensorboard") is None:
        from training.reporting.tensorboard import MISSING

        raise ConfigError(MISSING)
    if args.dataset and args.data_files:
        raise ConfigError("--dataset and --data-files both given: pass one (a prepared dataset holds its own text)")
    settings = build_settings(None if saved else preset, overrides, saved)
    if args.init_from_hf and not args.resume:
        settings = with_hf_model(settings, args.init_from_hf, overrides)
    resolve_device(settings.run.device)  # ConfigError before any work
    data_files, origin, dataset = args.data_files, "auto", None
    if args.resume:  # the run's own data, wherever --data-files / --dataset now finds it
        recorded = load_source(out_dir)
        data_files, origin = resume_source(recorded, args.data_files)
        if origin == "prepared":
            dataset = resume_prepared(recorded, args.dataset)
        elif args.dataset:
            raise DataError(f"this run did not train on a prepared dataset ({origin}); drop --dataset to resume it")
    elif args.dataset:
        from data.prepared import open_prepared

        dataset = args.dataset
        settings = with_prepared_vocab(settings, open_prepared(dataset), overrides)
    elif data_files is not None:
        check_files(data_files)
    req = RunRequest(settings, out_dir, data_files, args.resume, args.init_from_hf, origin,
                     None if args.resume else preset, dataset)
    if not args.plan:
        _check_writable(out_dir)
    return req, args.plan


def settings_asks_tensorboard(overrides, saved: dict | None) -> bool:
    asked = overrides.get("run", {}).get("tensorboard")
    return bool(asked if asked is not None else (saved or {}).get("run", {}).get("tensorboard"))


def with_prepared_vocab(settings, prepared, overrides):
    """The model's vocabulary is the prepared tokenizer's; a different --vocab_size given is refused."""
    asked = overrides.get("model", {}).get("vocab_size")
    if asked is not None and asked != prepared.vocab_size:
        raise ConfigError(f"--vocab_size={asked} but {prepared.path} was prepared with a {prepared.vocab_size}-token "
                          f"tokenizer: drop --vocab_size, or prepare the data again with --vocab_size {asked}")
    return replace(settings, model=replace(settings.model, vocab_size=prepared.vocab_size))


def _check_writable(out_dir: str) -> None:
    """Refuse an out-dir that cannot be created or written, without writing anything."""
    existing = existing_ancestor(os.path.abspath(out_dir))
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a directory" if not os.path.isdir(existing) else "is not writable"
        raise ConfigError(f"cannot write to --out-dir {out_dir}: {existing} {why}; choose a writable directory")


def take_run(req: RunRequest, rt) -> RunLock | None:
    """Rank 0 locks the run directory (creating it), then clears what killed writers left; every rank learns
    whether that worked. ConfigError if another process holds the run or the directory cannot be written."""
    lock, error = None, None
    if rt.is_master:
        try:
            lock = acquire(req.out_dir)
            if not req.resume and latest_checkpoint(req.out_dir, log=lambda _: None) is not None:
                raise ConfigError(f"{req.out_dir} already holds a run (it finished while this one waited); pass "
                                  "--resume to continue it, or choose another --out-dir")
            remove_stale_temporaries(req.out_dir)
        except (RunLocked, WriteFailed, ConfigError, CheckpointError) as e:
            error = e
            if lock is not None:
                lock.release()
    if not rt.broadcast_flag(error is None):
        raise ConfigError(str(error) if error else "rank 0 could not take the run directory; see its message")
    return lock


def resume_line(out_dir: str) -> str:
    """The command that continues the run, or what to do when nothing was saved yet."""
    if load_saved_settings(out_dir) is None:
        return "Nothing was saved yet: run the same command again to start over."
    return f"Resume with:\n  {resume_command(out_dir)}"


def main(argv: list[str]) -> int:
    try:
        req, plan_only = parse(argv)
        if plan_only:
            print(run_plan(req).table())
            return 0
    except (ConfigError, DataError, RunLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    new_dir = not os.path.exists(req.out_dir)
    rt = setup_runtime(req.settings.run.device, req.settings.run.precision, collective_timeout_for(req))
    # Signals are caught for the whole run, its error paths included: the launcher's SIGTERM to a rank that is
    # reporting a dead peer must not kill it before it has said so.
    with StopSignals(at_once=f"The last complete checkpoint is intact. {resume_line(req.out_dir)}") as stop:
        return run_to_exit_code(req, rt, stop, new_dir)


def run_to_exit_code(req: RunRequest, rt, stop: StopSignals, new_dir: bool) -> int:
    """Lock the run, train it, and turn each way it can end into its exit code and one message."""
    lock = None

    def stop_for_dead_peer(line: str) -> None:  # called from the peer watch's thread: the main one may be stuck
        print(f"error: {line}. {resume_line(req.out_dir)}", file=sys.stderr, flush=True)
        if lock is not None:
            lock.release()
        os._exit(1)

    if rt.watch is not None:
        rt.watch.on_peer_death = stop_for_dead_peer
    try:
        lock = take_run(req, rt)
        return EXIT[run_pipeline(req, rt, lambda: stop.received).status]
    except (ConfigError, DataError, CheckpointError, NotEnoughSpace) as e:
        print(f"error: {e}", file=sys.stderr)
        if new_dir and rt.is_master and lock is not None:  # a refused start leaves nothing behind
            lock.release()
            shutil.rmtree(req.out_dir, ignore_errors=True)
        return 2
    except WriteFailed as e:
        print(f"error: {e}\n{resume_line(req.out_dir)}", file=sys.stderr)
        return 1
    except CollectiveTimeout as e:
        print(f"error: {e}. {resume_line(req.out_dir)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        if rt.is_master:
            where = f"checkpoint saved: {e.checkpoint}" if e.checkpoint else "nothing new to save since the last checkpoint"
            print(f"\nStopped by {e.signal_name}; {where}.\n{resume_line(req.out_dir)}")
        return 130 if e.signal_name == "SIGINT" else 143
    except RuntimeError as e:  # a collective failed: a rank (or the network between them) died
        dead = rt.watch.dead_peers(wait=3.0) if rt.watch is not None else []
        if not dead and not isinstance(e, getattr(torch.distributed, "DistBackendError", ())):
            raise
        who = ", ".join(map(str, dead)) or "another rank"
        print(f"error: {who} died (a collective failed: {str(e).strip().splitlines()[0][:120]}): rank {rt.rank} "
              f"stops too. {resume_line(req.out_dir)}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
        teardown_runtime(rt)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Train a small LM on TinyStories in three phases, verifying growth at every transition.

    python train_tinystories.py                          # preset by device: cuda, else cpu
    python train_tinystories.py --preset micro           # smallest run that exercises everything (seconds)
    python train_tinystories.py --data-files ../shared/data/tinystories/train.txt --noise-std 0.2
    python train_tinystories.py --out-dir runs/x --resume
    python train_tinystories.py --help                   # every setting, its default and what it does
    torchrun --nproc_per_node=2 train_tinystories.py --preset micro     # DDP (gloo on CPU, NCCL on GPU)

The stages are training/pipeline.py's PIPELINE: phase 1 trains a dense model; transition 1 upcycles it into an
MoE and checks functional equivalence and routing; phase 2 trains the MoE; transition 2 grows it (width and
depth) and runs every check; phase 3 trains the grown MoE. Exit codes: 0 done, 1 halted (a failed check or a
divergence: the diagnosis and the command to resume are printed), 2 bad input (before any work), 130/143
stopped by SIGINT/SIGTERM after saving.
"""
from __future__ import annotations

import os
import sys

import torch

from config import ConfigError
from data import DataError, check_files
from training.checkpoint import CheckpointError, latest_checkpoint
from training.loop import TrainingInterrupted
from training.pipeline import RunRequest, run_pipeline
from training.runtime import StopSignals, setup_runtime, teardown_runtime
from training.settings import (build_settings, default_preset, load_saved_settings, make_parser, parse_command_line,
                               with_hf_model)

EXIT = {"finished": 0, "already_finished": 0, "halted": 1}


def parse(argv: list[str]) -> RunRequest:
    """The validated request, or ConfigError / DataError for any bad input (before any work)."""
    p = make_parser(__doc__.split("\n")[0], epilog="Settings follow; e.g. --noise-std=0.2, --noise_std 0.2 or --growth.noise_std=0.2")
    p.add_argument("--preset", help="micro | cpu | cuda (default: cuda if available, else cpu)")
    p.add_argument("--data-files", nargs="+", help="local TinyStories .txt (<|endoftext|> separated) or .json/.jsonl")
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
    if not args.resume and latest_checkpoint(out_dir, log=lambda _: None) is not None:
        raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out-dir")
    settings = build_settings(None if saved else preset, overrides, saved)
    if args.init_from_hf and not args.resume:
        settings = with_hf_model(settings, args.init_from_hf, overrides)
    if settings.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={settings.run.device} but torch.cuda.is_available() is False (a CPU build of torch, "
                          "or no GPU visible); use --device=cpu or --device=auto")
    if args.data_files is not None:
        check_files(args.data_files)
    _probe_writable(out_dir)
    return RunRequest(settings, out_dir, args.data_files, args.resume, args.init_from_hf)


def _probe_writable(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")  # per process: torchrun ranks probe at once
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to --out-dir {out_dir}: {e.strerror}; choose a writable directory") from None


def main(argv: list[str]) -> int:
    try:
        req = parse(argv)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rt = setup_runtime(req.settings.run.device)
    try:
        with StopSignals() as stop:
            return EXIT[run_pipeline(req, rt, lambda: stop.received).status]
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if rt.is_master:
            where = f"checkpoint saved: {e.checkpoint}" if e.checkpoint else "nothing new to save since the last checkpoint"
            print(f"\nStopped by {e.signal_name}; {where}.\nResume with:\n  python train_tinystories.py "
                  f"--out-dir {req.out_dir} --resume")
        return 130 if e.signal_name == "SIGINT" else 143
    finally:
        teardown_runtime(rt)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

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

import os
import shutil
import sys

import torch

from config import ConfigError
from data import DataError
from training.run_state.checkpoint import CheckpointError, latest_checkpoint
from common.files import NotEnoughSpace, WriteFailed
from training.run_state.disk import remove_stale_temporaries
from training.loop import TrainingInterrupted
from training.messages import resume_line
from training.pipeline import collective_timeout_for, run_pipeline
from training.plan import run_plan
from training.run_state.lock import RunLock, RunLocked, acquire
from training.parallel.runtime import CollectiveTimeout, StopSignals, setup_runtime, teardown_runtime
from training.settings import RunRequest, make_parser, parse_command_line, resolve_request

EXIT = {"finished": 0, "already_finished": 0, "halted": 1}


def parse(argv: list[str]) -> tuple[RunRequest, bool]:
    """The request (checked below, in training.settings.resolve_request) and whether only its plan is asked for;
    ConfigError / DataError for any bad input (before any work)."""
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
    req = resolve_request(overrides, preset=args.preset, out_dir=args.out_dir, resume=args.resume,
                          data_files=args.data_files, dataset=args.dataset, init_from_hf=args.init_from_hf,
                          plan_only=args.plan)
    return req, args.plan


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

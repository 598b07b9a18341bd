"""Atomic, verified checkpoints: one directory per checkpoint, written aside and renamed into place.

    out_dir/checkpoints/dense-000500/{model.safetensors, state.pt, meta.json}
    out_dir/checkpoints/LATEST          # name of the newest complete checkpoint
    ckpt, run_dir = find_checkpoint(path)   # a checkpoint directory, or a run directory (its newest checkpoint)

meta.json holds the model config, phase, step and a SHA-256 of each file, so a truncated or corrupted
checkpoint is detected on load and the previous good one is used instead. Every file is read as data, never as
code: weights from safetensors, state.pt scanned and then loaded weights-only (common/safe_load.py); a checkpoint
whose state.pt holds anything else is refused (CheckpointError) before any of it is unpickled. The hashes catch
accidents; the scan catches intent, since whoever alters a file can rewrite its hash too. A sharded run
(parallel=fsdp) gathers its model and optimizer state whole to rank 0 first (training/parallel/sharding.py): every checkpoint has this one format,
whatever number of processes wrote it or resumes it. A write that fails (disk full, I/O
error, permissions) raises common.files.WriteFailed after removing its partial files; earlier checkpoints and
LATEST are untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from common.files import PendingWrite, guarded_write, remove_quietly, sha256_file, tensor_bytes, write_atomic
from common.safe_load import UnsafeFile, load_torch_data, refuse_code
from config import ModelConfig
from models import build_model
from training.run_state.disk import checkpoint_bytes


WEIGHTS_FILE, STATE_FILE = "model.safetensors", "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming it and the problem."""


@dataclass
class Checkpoint:
    path: str
    meta: dict  # training state (phase, step, phase_done, global_step, eval_losses, data_position),
    # model_config, settings

    @property
    def phase(self) -> str:
        return self.meta["phase"]

    def load_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The checkpoint's model, built from its own config and loaded strictly."""
        try:
            model = build_model(ModelConfig(**self.meta["model_config"]))
            load_model(model, os.path.join(self.path, WEIGHTS_FILE), strict=True)
        except (RuntimeError, TypeError, ValueError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            first = next((line for line in lines if "mismatch" in line), lines[0])
            raise CheckpointError(f"{self.path}: its weights do not match its recorded architecture ({first[:160]}); "
                                  "it was not written by this project's model") from None
        return model.to(device)

    def load_state(self, mmap: bool = False) -> dict:
        """Optimizer, RNG and batch state, read as data only; mmap leaves the tensors on disk until read (a rank
        that needs only the RNG state of a large optimizer's checkpoint)."""
        try:
            state = load_torch_data(os.path.join(self.path, STATE_FILE), mmap=mmap)
        except UnsafeFile as e:
            raise CheckpointError(_altered(e, self.path)) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{os.path.join(self.path, STATE_FILE)} holds a {type(state).__name__}, not the "
                                  "dict of optimizer and RNG state a checkpoint saves: not written by this project")
        return state


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def save_checkpoint(out_dir: str, model: nn.Module, state: dict, meta: dict, keep_periodic: int = 2) -> str:
    """Write model weights, training state and meta into a new checkpoint directory; return its path.

    A failed write (disk full, I/O error, permissions) raises WriteFailed after removing the partial directory;
    LATEST and every earlier checkpoint are left as they were.
    """
    root = checkpoint_root(out_dir)
    name = f"{meta['phase']}-{meta['step']:06d}"
    final = os.path.join(root, name)
    with guarded_write(final, checkpoint_bytes(model, optimizer_slots=0) + tensor_bytes(state)) as write:
        os.makedirs(root, exist_ok=True)
        tmp = write.temporary(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        _write_files(tmp, model, state, dict(meta, name=name))
        replaced = _move_aside(final, write)
        os.replace(tmp, final)
    if replaced:
        remove_quietly(replaced)
    write_atomic(os.path.join(root, "LATEST"), name)
    _prune(root, keep_periodic)
    return final


def _move_aside(final: str, write: PendingWrite) -> str | None:
    """The same step saved again after a resume: move the older copy aside (restored if the save fails)."""
    if not os.path.exists(final):
        return None
    aside = os.path.join(os.path.dirname(final), f".old-{os.path.basename(final)}-{os.getpid()}")
    os.replace(final, aside)
    write.on_failure(lambda: None if os.path.exists(final) else os.replace(aside, final))
    return aside


def _write_files(directory: str, model: nn.Module, state: dict, meta: dict) -> None:
    """model.safetensors, state.pt and (last, with their hashes) meta.json, each fsynced."""
    weights, training_state = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, STATE_FILE)
    save_model(model, weights)  # handles a tied LM head
    with open(training_state, "wb") as f:  # a file object, so a failed write keeps its errno for the message
        torch.save(state, f, pickle_protocol=2)  # the protocol common/safe_load.py's scan expects
        f.flush()
        os.fsync(f.fileno())
    with open(weights, "rb+") as f:
        os.fsync(f.fileno())
    meta = dict(meta, files={os.path.basename(p): sha256_file(p) for p in (weights, training_state)})
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _prune(root: str, keep_periodic: int) -> None:
    """Keep every phase-end checkpoint and the newest keep_periodic others."""
    periodic = [c for c in list_checkpoints(root, verify=False) if not c.meta.get("phase_done")]
    for c in periodic[:-keep_periodic] if keep_periodic else periodic:
        shutil.rmtree(c.path, ignore_errors=True)


def read_checkpoint(path: str, verify: bool = True) -> Checkpoint | None:
    """The checkpoint in path, or None if it is unreadable or (with verify) its files fail their hashes.

    With verify, a checkpoint whose state.pt holds code is not skipped like a damaged one but refused:
    CheckpointError naming the file and what it holds (whoever planted it also rewrote the hash).
    """
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        files = meta["files"]
        if set(files) != {WEIGHTS_FILE, STATE_FILE} or not isinstance(meta["global_step"], int):
            return None
        if verify and any(sha256_file(os.path.join(path, n)) != h for n, h in files.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if verify:
        try:
            refuse_code(os.path.join(path, STATE_FILE))
        except UnsafeFile as e:
            raise CheckpointError(_altered(e, path)) from None
    return Checkpoint(path, meta)


def _altered(e: UnsafeFile, path: str) -> str:
    return (f"{e}: do not resume, sample or export this run; get it again from a source you trust (or delete "
            f"{path} to use an earlier checkpoint)")


def list_checkpoints(root: str, verify: bool = True) -> list[Checkpoint]:
    """Readable checkpoints, oldest first (by global step, then phase-end last)."""
    if not os.path.isdir(root):
        return []
    found = [read_checkpoint(os.path.join(root, n), verify) for n in os.listdir(root) if not n.startswith(".")]
    found = [c for c in found if c is not None and os.path.isdir(c.path)]
    return sorted(found, key=lambda c: (c.meta["global_step"], bool(c.meta.get("phase_done"))))


def latest_checkpoint(out_dir: str, log=print) -> Checkpoint | None:
    """The newest checkpoint whose files match their hashes; a damaged newer one is reported and skipped."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return None
    names = [n for n in os.listdir(root) if not n.startswith(".") and n != "LATEST"]
    good = list_checkpoints(root, verify=True)
    for bad in sorted(set(names) - {os.path.basename(c.path) for c in good}):
        log(f"checkpoint {os.path.join(root, bad)} is incomplete or corrupted (hash mismatch): skipped")
    return good[-1] if good else None


def find_checkpoint(path: str) -> tuple[Checkpoint, str]:
    """(checkpoint, run directory) for a checkpoint directory or a run directory (its newest good checkpoint).

    CheckpointError (a ValueError), one line naming the path and the problem, when there is none.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory; pass a run directory (--out-dir of a training run) "
                              "or one of its checkpoints/<phase>-<step> directories")
    if os.path.exists(os.path.join(path, "meta.json")):
        ckpt = read_checkpoint(path)
        if ckpt is None:
            raise CheckpointError(f"{path}: checkpoint is incomplete or corrupted (hash mismatch)")
        return ckpt, os.path.dirname(os.path.dirname(os.path.abspath(path)))
    ckpt = latest_checkpoint(path, log=lambda _: None)
    if ckpt is None:
        raise CheckpointError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")
    return ckpt, path

"""Atomic, verified checkpoints: one directory per checkpoint, written aside and renamed into place.

    out_dir/checkpoints/dense-000500/{model.safetensors, state.pt, meta.json}
    out_dir/checkpoints/LATEST          # name of the newest complete checkpoint

meta.json holds the model config, phase, step and a SHA-256 of each file, so a truncated or corrupted
checkpoint is detected on load and the previous good one is used instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from config import ModelConfig
from models import build_model

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
            load_model(model, os.path.join(self.path, "model.safetensors"), strict=True)
        except (RuntimeError, TypeError, ValueError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            first = next((line for line in lines if "mismatch" in line), lines[0])
            raise CheckpointError(f"{self.path}: its weights do not match its recorded architecture ({first[:160]}); "
                                  "it was not written by this project's model") from None
        return model.to(device)

    def load_state(self) -> dict:
        return torch.load(os.path.join(self.path, "state.pt"), map_location="cpu", weights_only=False)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def save_checkpoint(out_dir: str, model: nn.Module, state: dict, meta: dict, keep_periodic: int = 2) -> str:
    """Write model weights, training state and meta into a new checkpoint directory; return its path."""
    root = checkpoint_root(out_dir)
    os.makedirs(root, exist_ok=True)
    name = f"{meta['phase']}-{meta['step']:06d}"
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    save_model(model, os.path.join(tmp, "model.safetensors"))  # handles a tied LM head
    torch.save(state, os.path.join(tmp, "state.pt"))
    meta = dict(meta, name=name, files={f: _sha256(os.path.join(tmp, f)) for f in ("model.safetensors", "state.pt")})
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    final = os.path.join(root, name)
    if os.path.exists(final):  # the same step saved again after a resume: replace the older copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(os.path.join(root, "LATEST"), name)
    _prune(root, keep_periodic)
    return final


def _prune(root: str, keep_periodic: int) -> None:
    """Keep every phase-end checkpoint and the newest keep_periodic others."""
    periodic = [c for c in list_checkpoints(root, verify=False) if not c.meta.get("phase_done")]
    for c in periodic[:-keep_periodic] if keep_periodic else periodic:
        shutil.rmtree(c.path, ignore_errors=True)


def read_checkpoint(path: str, verify: bool = True) -> Checkpoint | None:
    """The checkpoint in path, or None if it is unreadable or (with verify) its files fail their hashes."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if verify and any(_sha256(os.path.join(path, n)) != h for n, h in meta["files"].items()):
            return None
        return Checkpoint(path, meta)
    except (OSError, ValueError, KeyError):
        return None


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

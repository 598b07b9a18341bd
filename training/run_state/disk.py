"""What a run writes: checkpoint sizes before they exist, and cleaning up after a killed writer.

    from training.run_state.disk import checkpoint_bytes, peak_checkpoint_bytes, remove_stale_temporaries
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from common.files import SAFETENSORS_PER_TENSOR, dir_bytes, remove_quietly, unique_tensors
from common.formats import human

if TYPE_CHECKING:
    from torch import nn

    from config import ModelConfig


# per-tensor bookkeeping in state.pt, measured on this project's checkpoints: torch.save's zip record (local +
# central header, 64-byte alignment) and pickle, AdamW's per-parameter step (safetensors': common.files)
STATE_PER_TENSOR = 250
_FIXED = 16 * 1024  # meta.json (settings, model config: ~3 KiB), torch RNG state (~5 KiB), headers


def checkpoint_bytes(model: "nn.Module | ModelConfig | int", optimizer_slots: int = 2, dtype_bytes: int = 4) -> int:
    """Estimated size of one checkpoint: weights + AdamW's moments (optimizer_slots per weight) + bookkeeping.

    model: a model, a ModelConfig (its model is built on the meta device: no memory, no time) or a parameter
    count (then dtype_bytes per value, fp32 as the pipeline trains).
    """
    if hasattr(model, "__dataclass_fields__"):  # a ModelConfig
        import torch

        from models import build_model

        with torch.device("meta"):
            model = build_model(model)
    if isinstance(model, int):
        n_tensors = 0
        weights = model * dtype_bytes
    else:
        params = unique_tensors(model.parameters())
        weights = sum(p.numel() * p.element_size() for p in params)
        n_tensors = len(params)
    per_tensor = n_tensors * (SAFETENSORS_PER_TENSOR + optimizer_slots * STATE_PER_TENSOR)
    return weights * (1 + optimizer_slots) + per_tensor + _FIXED


def peak_checkpoint_bytes(stage_bytes: list[int], keep_periodic: int = 2) -> int:
    """Most bytes the checkpoints directory holds at once over a run of stages (one checkpoint size each).

    save_checkpoint keeps every stage-end checkpoint and the newest keep_periodic others, and writes a new
    one before pruning, so during stage i: the earlier stages' ends + (keep_periodic + 1) of stage i's size.
    """
    return max(sum(stage_bytes[:i]) + (keep_periodic + 1) * b for i, b in enumerate(stage_bytes))


# temporaries each write site leaves if its process is killed mid-write (a failed write removes its own)
_TEMPORARY_PATTERNS = ("checkpoints/.tmp-*", ".tmp-*", "tokenizer.tmp-*", "cache/tokens-*.tmp-*", "cache/.tmp-*",
                       "loss_curve.png.tmp-*")
# set-aside previous versions: put back if the write that replaces them was killed before its rename
_ASIDE_PATTERNS = {"checkpoints/.old-*": lambda name: name[len(".old-"):].rsplit("-", 1)[0],
                   "tokenizer.old-*": lambda name: "tokenizer"}


def remove_stale_temporaries(out_dir: str, log=print) -> int:
    """Delete what killed writers left in out_dir and restore set-aside copies; return the bytes freed.

    Call it only while holding the run's lock (training.run_state.lock): a live writer's temporaries look the same.
    """
    import glob

    freed = 0
    for pattern in _TEMPORARY_PATTERNS:
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            freed += dir_bytes(path) if os.path.isdir(path) else os.path.getsize(path)
            remove_quietly(path)
    for pattern, original in _ASIDE_PATTERNS.items():
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            target = os.path.join(os.path.dirname(path), original(os.path.basename(path)))
            if os.path.exists(target):
                freed += dir_bytes(path)
                remove_quietly(path)
            else:
                os.replace(path, target)
                log(f"note: restored {target}, set aside by a write that was killed before it finished")
    if freed:
        log(f"note: removed {human(freed)} of temporary files left in {out_dir} by a killed run")
    return freed

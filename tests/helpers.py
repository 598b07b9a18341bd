"""Builders several test files share (conftest.py holds the fixtures); no test module imports another."""
import json
import os
import socket

import torch

from common.processes import proc_stat
from config import config_to_dict
from data import save_tokenizer
from data.source import SOURCE_FILE
from training.run_state.checkpoint import save_checkpoint
from transfer import dense_to_moe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def make_run(out_dir, models: dict, tokenizer, settings: dict | None = None, source: dict | None = None) -> str:
    """A run directory as training leaves one: a checkpoint per {phase: model}, the tokenizer, and optionally
    settings.json and data_source.json."""
    out_dir = str(out_dir)
    for step, (phase, model) in enumerate(models.items(), start=1):
        meta = dict(phase=phase, step=step, global_step=step, phase_done=True,
                    model_config=config_to_dict(model.config), settings=settings or {})
        save_checkpoint(out_dir, model, {}, meta)
    save_tokenizer(tokenizer, os.path.join(out_dir, "tokenizer"))
    for name, record in (("settings.json", settings), (SOURCE_FILE, source)):
        if record is not None:
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(record, f)
    return out_dir


def trained_like_moe(dense):
    """An upcycled MoE whose experts and router have moved apart, so routing changes the function."""
    moe = dense_to_moe(dense, 4, 2)
    with torch.no_grad():
        for b in moe.blocks:
            for p in (b.ffn.gate_proj, b.ffn.up_proj, b.ffn.down_proj):
                p.add_(torch.randn_like(p) * 0.02)
            b.ffn.router.weight.mul_(30)
    return moe


def free_port() -> int:
    """A TCP port free on this machine now (torchrun's rendezvous): fixed ports collide with another suite's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        fields = proc_stat(int(entry)) if entry.isdigit() else None
        if fields:
            found[int(entry)] = int(fields[1])
    return found


def children(pid: int) -> list[int]:
    """The processes whose parent is pid."""
    return sorted(child for child, parent in parents().items() if parent == pid)


def command_line(pid: int) -> str:
    """The process's command line, words joined by spaces ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""

"""What the run tells the user: phase headers, metrics.jsonl, the loss-curve picture."""
from __future__ import annotations

import json
import os

from torch import nn

from training.checkpoint import write_text_atomic
from training.disk import guarded_write

BAR = "=" * 72


def phase_header(title: str, steps: int, lr: float, device: str, model: nn.Module) -> str:
    cfg = model.config
    total, active = model.num_parameters(), model.num_parameters(active=True)
    experts = f" (top-{cfg.top_k} of {cfg.n_experts} experts)" if cfg.is_moe else " (dense)"
    return "\n".join([BAR, f"{title} | {steps} steps | lr {lr:.1e} | device {device}",
                      f"Model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads"
                      + (f", {cfg.n_experts} experts" if cfg.is_moe else ""),
                      f"Total parameters: {total:,}",
                      f"Active parameters per token: {active:,}{experts}",
                      f"Efficiency: {100 * active / total:.1f}% active per forward pass", BAR])


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records past the checkpoint's global step are dropped first."""

    def __init__(self, path: str, resume_global_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled and resume_global_step is not None and os.path.exists(path):
            kept = [line for line in open(path) if (r := _parse(line)) and r.get("global_step", 0) <= resume_global_step]
            write_text_atomic(path, "".join(kept))
        elif enabled and resume_global_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, **record) -> None:
        """Append one record; a failed append is WriteFailed, the file cut back to the records before it."""
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        with guarded_write(self.path, len(line.encode())) as write:
            write.on_failure(lambda: os.truncate(self.path, size))
            with open(self.path, "a") as f:
                f.write(line)

    def records(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        return [r for line in open(self.path) if (r := _parse(line))]


def _parse(line: str) -> dict | None:
    """One record, or None for a blank line or the half-written last line of a killed process."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def plot_losses(records: list[dict], path: str, stages, title: str = "") -> str | None:
    """Train and eval loss of every stage on one axis, transitions marked; written atomically as PNG.

    stages: the pipeline's table (each with .name, .label, .transition), in order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    starts = {}
    for i, stage in enumerate(stages):
        train = [r for r in records if r["phase"] == stage.name and r["kind"] == "train"]
        evals = [r for r in records if r["phase"] == stage.name and r["kind"] == "eval"]
        if train:
            starts[stage.name] = min(r["global_step"] for r in train)
            ax.plot([r["global_step"] for r in train], [r["loss"] for r in train], color=f"C{i}", alpha=0.6,
                    label=f"{stage.label} train")
        if evals:
            ax.plot([r["global_step"] for r in evals], [r["loss"] for r in evals], "o-", color=f"C{i}",
                    label=f"{stage.label} eval")
    for previous, stage in zip(stages, stages[1:]):
        before = [r["global_step"] for r in records if r["phase"] == previous.name]
        if stage.name in starts and before:  # the transition happens right after the previous stage's last step
            ax.axvline(max(before), color="grey", linestyle="--")
            ax.text(max(before), ax.get_ylim()[1], f" {stage.transition}", va="top", color="grey")
    ax.set_xlabel("global step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "growth-verified training")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = f"{path}.tmp-{os.getpid()}.png"  # per process: two writers never rename each other's file away
    try:
        with guarded_write(path) as write:
            fig.savefig(write.temporary(tmp), dpi=110, bbox_inches="tight")
            os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path

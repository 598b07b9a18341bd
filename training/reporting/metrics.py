"""What the run tells the user: phase headers, metrics.jsonl (and any sinks fed the same records, e.g.
training.reporting.tensorboard.TensorBoardSink), the loss-curve picture against steps, tokens or FLOPs."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Protocol

from torch import nn

from common.files import write_atomic
from common.files import guarded_write

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


class Sink(Protocol):
    """Anything that takes every record MetricsLog writes (TensorBoard, say)."""

    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records past the checkpoint's global step are dropped first.
    Each sink gets every record written after it reached the file; a disabled log (ranks > 0) feeds none."""

    def __init__(self, path: str, resume_global_step: int | None = None, enabled: bool = True,
                 sinks: Iterable[Sink] = (), resume_phase: str | None = None):
        self.path, self.enabled, self.sinks = path, enabled, list(sinks)
        if enabled and resume_global_step is not None and os.path.exists(path):
            kept = [line for line in open(path) if (r := _parse(line)) and _before(r, resume_global_step, resume_phase)]
            write_atomic(path, "".join(kept))
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
        for sink in self.sinks:
            sink.write(record)

    def records(self) -> list[dict]:
        return read_records(self.path)

    def close(self) -> None:
        """Close the sinks (the file itself is closed after every write)."""
        for sink in self.sinks:
            sink.close()


def _before(record: dict, global_step: int, phase: str | None) -> bool:
    """Whether a record precedes a checkpoint at (global_step, phase): a finished phase's checkpoint shares its
    global step with the next stage's transition and step-0 eval, which the resumed run writes again."""
    step = record.get("global_step", 0)
    stage = record.get("phase") or record.get("stage")
    return step < global_step or (step == global_step and (phase is None or stage is None or stage == phase))


def read_records(path: str) -> list[dict]:
    """Every record of a metrics.jsonl; [] when it does not exist; unreadable lines skipped."""
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return [r for line in f if (r := _parse(line))]


def _parse(line: str) -> dict | None:
    """One record, or None for a blank line, the half-written last line of a killed process, or a non-object."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def number(x) -> float | None:
    """x as a finite float, or None (missing, null, NaN, a string): what the plots may draw."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


# x axis of the loss plots: record field and axis label
X_AXES = {"step": ("global_step", "global step"), "tokens": ("tokens", "tokens trained (all processes)"),
          "flops": ("flops", "training FLOPs")}


def x_axis(records: list[dict], x: str) -> tuple[str, str]:
    """(record field, axis label) for x; global steps, labelled so, when any curve record lacks the field
    (a run logged before records carried tokens and FLOPs)."""
    if x not in X_AXES:
        raise ValueError(f"x={x!r} is not an axis of the loss plot: choose one of {', '.join(X_AXES)}")
    key, label = X_AXES[x]
    curve = [r for r in records if r.get("kind") in ("train", "eval")]
    if key != "global_step" and any(number(r.get(key)) is None for r in curve):
        return "global_step", f"global step (these records carry no {x})"
    return key, label


def loss_figure(records: list[dict], stages, x: str = "step", title: str = ""):
    """A matplotlib Figure of every stage's train and eval loss against x ("step", "tokens" or "flops"), phases
    coloured, transitions marked; None without records. stages: the pipeline's table (.name, .label,
    .transition), in order. A grown model's step-0 eval sits on its parent's last eval: one point, ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = x_axis(records, x)
    curves = {(st.name, kind): [(number(r.get(key)), number(r.get("loss"))) for r in records
                                if r.get("phase") == st.name and r.get("kind") == kind]
              for st in stages for kind in ("train", "eval")}
    curves = {k: [p for p in v if None not in p] for k, v in curves.items()}
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    for i, stage in enumerate(stages):
        train, evals = curves[stage.name, "train"], curves[stage.name, "eval"]
        if train:
            ax.plot(*zip(*train), color=f"C{i}", alpha=0.6, label=f"{stage.label} train")
        if evals:
            ax.plot(*zip(*evals), "o-", color=f"C{i}", label=f"{stage.label} eval")
    for k, (previous, stage) in enumerate(zip(stages, stages[1:])):
        before = curves[previous.name, "train"] + curves[previous.name, "eval"]
        after = curves[stage.name, "train"] + curves[stage.name, "eval"]
        if before and after:  # the transition happens right after the previous stage's last step
            at = max(p[0] for p in before)
            ax.axvline(at, color="grey", linestyle="--")
            # staggered: transitions close together on a FLOPs axis would print over each other
            ax.text(at, 0.98 - 0.06 * k, f" {stage.transition}", va="top", color="grey",
                    transform=ax.get_xaxis_transform())
            joined = [p for p in curves[stage.name, "eval"] if p[0] == at]
            if joined:
                ax.plot(*joined[0], "o", markersize=12, markerfacecolor="none", markeredgecolor="black")
    ax.set_xlabel(label)
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "growth-verified training")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_losses(records: list[dict], path: str, stages, title: str = "", x: str = "step") -> str | None:
    """Train and eval loss of every stage on one axis against x ("step", "tokens" or "flops"), transitions
    marked; written atomically as PNG. None (nothing written) without records to draw."""
    import matplotlib.pyplot as plt

    fig = loss_figure(records, stages, x, title)
    if fig is None:
        return None
    tmp = f"{path}.tmp-{os.getpid()}.png"  # per process: two writers never rename each other's file away
    try:
        with guarded_write(path) as write:
            fig.savefig(write.temporary(tmp), dpi=110, bbox_inches="tight")
            os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path

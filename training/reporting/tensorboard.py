"""TensorBoard scalars from the same records metrics.jsonl gets: a sink for training.reporting.metrics.MetricsLog.

    log = MetricsLog(path, sinks=[TensorBoardSink(os.path.join(out_dir, "tensorboard"))])   # rank 0 only
    ...
    log.close()

x is global_step throughout. Tags: train/{loss,lr,tokens_per_s,mfu,balance}, eval/loss,
routing_load/<phase>/layer<l>/expert<e>, routing_entropy/<phase>/layer<l>, clone_divergence/<kind>. Routing
tags name the phase because a layer index means another layer after growth inserts blocks. tensorboard is an
optional dependency: without it, constructing the sink is TensorBoardMissing.
"""
from __future__ import annotations

from training.reporting.metrics import number

TRAIN_FIELDS = ("loss", "lr", "tokens_per_s", "mfu", "balance")
MISSING = "tensorboard=true needs the tensorboard package: pip install tensorboard"


class TensorBoardMissing(RuntimeError):
    """The tensorboard package is not installed."""


class TensorBoardSink:
    """Writes each metrics record's scalars to an event file under log_dir. purge_step: on resume, events of
    the killed run at or past this global step are dropped (they are replayed from the checkpoint)."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch.utils.tensorboard imports the tensorboard package itself
            raise TensorBoardMissing(MISSING) from None
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def write(self, record: dict) -> None:
        """The record's scalars at its global_step; records without one, and null or non-numeric fields, add nothing."""
        step = record.get("global_step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def scalars(record: dict) -> dict[str, float]:
    """tag -> value of the scalars one record carries (train, eval with routing and clone divergence)."""
    kind, out = record.get("kind"), {}
    if kind == "train":
        out = {f"train/{k}": number(record.get(k)) for k in TRAIN_FIELDS}
    elif kind == "eval":
        out["eval/loss"] = number(record.get("loss"))
        out |= _routing(str(record.get("phase")), record.get("routing"))
        divergence = record.get("clone_divergence")
        if isinstance(divergence, dict):
            out |= {f"clone_divergence/{k}": number(v) for k, v in divergence.items()}
    return {tag: v for tag, v in out.items() if v is not None}


def _routing(phase: str, routing) -> dict[str, float | None]:
    if not isinstance(routing, dict):
        return {}
    out = {}
    for layer, row in enumerate(routing.get("load") or []):
        if isinstance(row, list):
            out |= {f"routing_load/{phase}/layer{layer}/expert{e}": number(v) for e, v in enumerate(row)}
    for layer, value in enumerate(routing.get("entropy") or []):
        out[f"routing_entropy/{phase}/layer{layer}"] = number(value)
    return out

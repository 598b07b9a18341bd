"""Tests of the TensorBoard sink (training/reporting/tensorboard.py) and of MetricsLog feeding sinks (training/reporting/metrics.py).

The missing-package message and the record -> scalars mapping run everywhere; writing event files and reading
them back with tensorboard's EventAccumulator needs the optional tensorboard package (skipped without it).

    OMP_NUM_THREADS=1 python -m pytest -q tests/training/reporting/test_tensorboard.py
"""
from __future__ import annotations

import sys

import pytest

from training.reporting.metrics import MetricsLog
from training.reporting.tensorboard import MISSING, TensorBoardMissing, TensorBoardSink, scalars

TRAIN = {"kind": "train", "phase": "moe", "step": 5, "global_step": 35, "loss": 3.25, "lr": 6e-4, "time": 1.0,
         "tokens": 17920, "flops": 1.2e10, "epochs": 0.1, "tokens_per_s": 2048.0, "tokens_per_s_per_process": 1024.0,
         "mfu": None, "balance": 1.03}
EVAL = {"kind": "eval", "phase": "grown", "step": 10, "global_step": 60, "loss": 2.5, "time": 2.0, "tokens": 30720,
        "flops": 3e10, "epochs": 0.2,
        "routing": {"load": [[0.25, 0.5, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]], "entropy": [0.75, 1.0], "dead": [1, 0]},
        "clone_divergence": {"attention_heads": 1e-3, "ffn_neurons": 2e-3, "residual": 5e-4, "min": 5e-4}}
EXPECTED = {"train/loss": 3.25, "train/lr": 6e-4, "train/tokens_per_s": 2048.0, "train/balance": 1.03}
EXPECTED_EVAL = {"eval/loss": 2.5, "routing_entropy/grown/layer0": 0.75, "routing_entropy/grown/layer1": 1.0,
                 "clone_divergence/attention_heads": 1e-3, "clone_divergence/ffn_neurons": 2e-3,
                 "clone_divergence/residual": 5e-4, "clone_divergence/min": 5e-4,
                 **{f"routing_load/grown/layer{layer}/expert{e}": v for layer, row in enumerate(EVAL["routing"]["load"])
                    for e, v in enumerate(row)}}


def test_missing_package_is_one_line_with_the_fix(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError, as when absent
    with pytest.raises(TensorBoardMissing) as e:
        TensorBoardSink(str(tmp_path / "tb"))
    assert str(e.value) == "tensorboard=true needs the tensorboard package: pip install tensorboard" == MISSING
    assert isinstance(e.value, RuntimeError) and "\n" not in str(e.value)


def test_records_map_to_the_expected_scalars():
    assert scalars(TRAIN) == EXPECTED  # mfu null: no point rather than a fake 0
    assert scalars(EVAL) == EXPECTED_EVAL
    assert scalars({**TRAIN, "loss": float("nan"), "lr": "high"}) == {k: v for k, v in EXPECTED.items()
                                                                     if k not in ("train/loss", "train/lr")}
    assert scalars({"kind": "start", "global_step": 0, "world_size": 2}) == {}
    assert scalars({**EVAL, "routing": {"load": "?", "entropy": None}, "clone_divergence": 3}) == {"eval/loss": 2.5}


class ListSink:
    def __init__(self):
        self.records, self.closed = [], False

    def write(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


def test_metrics_log_feeds_every_record_to_its_sinks_and_closes_them(tmp_path):
    a, b = ListSink(), ListSink()
    log = MetricsLog(str(tmp_path / "m.jsonl"), sinks=[a, b])
    log.write(**TRAIN)
    log.write(**EVAL)
    assert a.records == b.records == [TRAIN, EVAL] == log.records()
    assert not a.closed
    log.close()
    assert a.closed and b.closed
    off = ListSink()
    MetricsLog(str(tmp_path / "r1.jsonl"), enabled=False, sinks=[off]).write(**TRAIN)  # ranks > 0 feed nothing
    assert off.records == []
    MetricsLog(str(tmp_path / "plain.jsonl")).close()  # no sinks: still fine


# --------------------------------------------------------------------------- with the tensorboard package
def read_events(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_events_hold_the_expected_tags_and_values(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency (pip install tensorboard)")
    sink = TensorBoardSink(str(tmp_path / "tb"))
    log = MetricsLog(str(tmp_path / "m.jsonl"), sinks=[sink])
    log.write(kind="start", global_step=0, time=0.0, device="cpu")
    log.write(**TRAIN)
    log.write(**EVAL)
    sink.write({"kind": "train", "loss": 9.0})  # no global_step: nothing written
    log.close()
    events = read_events(str(tmp_path / "tb"))
    want = {tag: [(35, v)] for tag, v in EXPECTED.items()} | {tag: [(60, v)] for tag, v in EXPECTED_EVAL.items()}
    assert set(events) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_resume_purges_the_killed_runs_later_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency (pip install tensorboard)")
    log_dir = str(tmp_path / "tb")
    first = TensorBoardSink(log_dir)
    for g in range(1, 7):
        first.write({"kind": "train", "global_step": g, "loss": 10.0 + g})
    first.close()
    resumed = TensorBoardSink(log_dir, purge_step=5)  # checkpoint at step 4: steps 5, 6 are replayed
    for g in (5, 6):
        resumed.write({"kind": "train", "global_step": g, "loss": 1.0 + g})
    resumed.close()
    assert read_events(log_dir)["train/loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 6.0), (6, 7.0)]

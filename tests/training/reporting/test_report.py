

from models import build_model
from tests.conftest import tiny_config
from training.stages import PIPELINE
from training.reporting.metrics import MetricsLog, phase_header, plot_losses


def test_header_reports_active_share_for_moe():
    text = phase_header("Phase 2: MoE", 10, 1e-3, "cpu", build_model(tiny_config(n_experts=4, top_k=1)))
    assert "(top-1 of 4 experts)" in text and "Efficiency:" in text and "Total parameters:" in text


def test_metrics_log_truncates_past_the_resume_point(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path)
    for g in range(1, 7):
        log.write(kind="train", phase="dense", step=g, global_step=g, loss=1.0 / g)
    assert len(MetricsLog(path, resume_global_step=4).records()) == 4
    assert MetricsLog(path).records() == []  # a fresh run starts a fresh log


def test_plot_marks_all_phases(tmp_path):
    recs = [dict(kind=k, phase=p, global_step=g, loss=5 - g / 10) for g, p in
            [(1, "dense"), (2, "dense"), (3, "moe"), (4, "moe"), (5, "grown"), (6, "grown")] for k in ("train", "eval")]
    out = plot_losses(recs, str(tmp_path / "curve.png"), PIPELINE)
    assert out and open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_losses([], str(tmp_path / "none.png"), PIPELINE) is None

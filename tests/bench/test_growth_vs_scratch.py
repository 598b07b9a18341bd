"""bench/growth_vs_scratch.py: the figures it reports, and a micro-scale run of every arm."""
import json

import pytest

from bench.growth_vs_scratch import Curve, compare, first_reach, loss_at, main


def curve(name, flops, loss, wall=None):
    return Curve(name, list(flops), list(wall or flops), list(loss))


def test_first_reach_interpolates_between_eval_points():
    c = curve("p", [1, 2, 3], [3.0, 2.0, 1.0])
    assert first_reach(c, 1.5) == pytest.approx(2.5)
    assert first_reach(c, 3.5) == 1  # already below at the first point
    assert first_reach(c, 0.5) is None


def test_loss_at_interpolates_inside_and_refuses_outside():
    c = curve("p", [10, 20], [2.0, 1.0])
    assert loss_at(c, 15) == pytest.approx(1.5)
    assert loss_at(c, 20) == 1.0
    assert loss_at(c, 5) is None and loss_at(c, 25) is None


def test_compare_reports_flop_ratio_when_the_pipeline_reaches_scratch():
    pipe = curve("pipeline", [1, 2, 3, 4], [3.0, 2.0, 1.5, 1.2], wall=[10, 20, 30, 40])
    scratch = curve("scratch", [2, 4], [2.5, 1.75], wall=[30, 60])
    r = compare(pipe, scratch)
    assert r["reach_tflop"] * 1e12 == pytest.approx(2.5)  # 2.0 -> 1.5 crosses 1.75 halfway
    assert r["flop_ratio"] == pytest.approx(4 / 2.5)
    assert r["wall_ratio"] == pytest.approx(60 / 25)
    assert r["gap_at_100pct"] == pytest.approx(1.2 - 1.75)
    assert r["gap_at_50pct"] == pytest.approx(2.0 - 2.5)


def test_compare_reports_the_reverse_ratio_when_the_pipeline_never_gets_there():
    pipe = curve("pipeline", [1, 2], [3.0, 2.0])
    scratch = curve("scratch", [1, 2], [2.5, 1.5])
    r = compare(pipe, scratch)
    assert "reach_tflop" not in r
    assert r["scratch_reaches_pipeline_final_at_tflop"] * 1e12 == pytest.approx(1.5)
    assert r["flop_ratio"] == pytest.approx(0.75)  # < 1: growth cost compute
    assert r["gap_at_100pct"] == pytest.approx(0.5)


@pytest.mark.slow
def test_micro_run_of_every_arm_spends_equal_flops_and_shares_phases_one_and_two(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--scale", "micro", "--out-dir", str(out), "--arms", "pipeline,scratch,dense_grown,small_moe",
            "--grown_lrs=1e-3,3e-4", "--scratch_lrs=1e-3", "--max_stories=300", "--offline_stories=300"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    curves = {c["name"]: c for c in results["curves"]}
    assert set(curves) == {"pipeline, grown lr 0.001, noise 0.3", "pipeline, grown lr 0.0003, noise 0.3",
                           "dense grown (no MoE)", "small MoE, no growth", "scratch, lr 0.001"}
    a, b = curves["pipeline, grown lr 0.001, noise 0.3"], curves["pipeline, grown lr 0.0003, noise 0.3"]
    n = len(a["flops"]) - 3  # micro: 30 grown steps, eval every 10
    assert a["loss"][:n] == b["loss"][:n] and a["flops"] == b["flops"] and a["loss"][n:] != b["loss"][n:]
    assert len(a["phase_starts"]) == 2 and len(curves["dense grown (no MoE)"]["phase_starts"]) == 1
    small = curves["small MoE, no growth"]
    assert small["loss"][:n] == a["loss"][:n] and len(small["phase_starts"]) == 1
    budget = a["flops"][-1]
    step = budget / 30  # no arm is more than one step of the biggest model off the pipeline's budget
    for c in curves.values():
        assert abs(c["flops"][-1] - budget) <= step and all(x < y for x, y in zip(c["wall"], c["wall"][1:]))
    assert len(results["comparisons"]) == 2 and all(r["flop_ratio"] is not None for r in results["comparisons"])
    assert (out / "growth_vs_scratch.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert text.count("✓ ALL CHECKS PASSED") == 3 and "GROWTH VS SCRATCH" in text
    assert main(["--plot-runs", str(out), str(out), "--out-dir", str(tmp_path / "cmp"), "--from-tflop", "0.01"]) == 0
    assert (tmp_path / "cmp" / "runs_compared.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--plot-runs", str(tmp_path / "none"), "--out-dir", str(tmp_path / "cmp2")]) == 2


def test_bad_arms_exit_2_before_any_work(tmp_path, capsys):
    assert main(["--scale", "micro", "--out-dir", str(tmp_path / "x"), "--arms", "scratch"]) == 2
    assert capsys.readouterr().err.startswith("error:") and not (tmp_path / "x").exists()

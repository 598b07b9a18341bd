"""Tests of report.html (training/reporting/html_report.py) and of the loss plot's x axis (training/reporting/metrics.py).

A synthetic run directory written by hand after the metrics.jsonl schema (start, train, eval with routing and
clone divergence, transition with every check's record, sample, outcome), plus settings.json and
data_source.json: every section shows the records' numbers, text from the files stays text, absent data
degrades to one line, broken files do not crash. Then headless Chromium renders the page: the screenshot is
not blank and every image is an inline PNG (skipped only where no Chromium binary is installed).

    OMP_NUM_THREADS=1 python -m pytest -q tests/training/reporting/test_html_report.py
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

from training.reporting import html_report
from training.reporting.html_report import ChromiumMissing, dump_dom, find_chromium, render_report, screenshot, write_report
from training.stages import PIPELINE
from training.reporting.metrics import loss_figure, plot_losses
from training.settings import build_settings
from transfer.checks.results import CheckResult

PHASES = {"dense": 30, "moe": 20, "grown": 20}  # steps, as the micro preset
TOKENS_PER_STEP = 512
PARAMS = {"dense": 2.1e5, "moe": 3.0e5, "grown": 1.3e6}  # active parameters: FLOPs = 6 N tokens
EXPERTS, LAYERS = 4, {"moe": 2, "grown": 4}
T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
SCRIPT = '<script>alert("x")</script>'
FINAL_EVAL = 2.3456  # the grown phase's last eval loss
TRAIN_TOKENS = 123_456


def check(name, passed, quantity, value, limit, higher=False, fix="", cause=None, message=None) -> dict:
    return CheckResult(name, passed, message or f"{name}: {quantity} {value} (limit {limit})", {}, fix, cause,
                       quantity=quantity, value=value, limit=limit, higher_is_better=higher).to_record()


def transition_checks(index: int, symmetry_passed: bool = True) -> dict:
    shared = {"functional": check("Functional equivalence", True, "max relative drift of hidden states", 3.1e-7, 1e-5),
              "router": check("Router integrity", True, "max router-logit drift", 4.2e-8, 1e-5),
              "trainability": check("Trainability", True, "weights that never receive gradient", 0, 0)}
    if index == 1:
        return shared
    noise = 0.0421 if symmetry_passed else 0.0
    return {"rope": check("RoPE integrity", True, "max attention-probability drift", 6.6e-8, 1e-5),
            "symmetry": check("Symmetry breaking", symmetry_passed, "median relative gradient difference", noise,
                              1e-3, higher=True, fix="" if symmetry_passed else "raise noise_std <b>& more</b>"),
            **shared}


def routing(phase: int, i: int, layers: int, dead_layer: int | None = None) -> dict:
    """Loads drifting from balanced towards one favourite expert; dead_layer's expert 3 dies at eval i >= 2."""
    load, entropy, dead = [], [], []
    for layer in range(layers):
        row = [0.25 + 0.02 * (i + layer) * (1 if e == 0 else -1 / 3) for e in range(EXPERTS)]
        if layer == dead_layer and i >= 2:
            row = [row[0] + row[3] / 3, row[1] + row[3] / 3, row[2] + row[3] / 3, 0.0]
        load.append([round(x, 6) for x in row])
        entropy.append(round(-sum(x * math.log(x) for x in row if x > 0) / math.log(EXPERTS), 6))
        dead.append(sum(1 for x in row if x == 0))
    return {"load": load, "entropy": entropy, "dead": dead}


def synthetic_records(stop: str = "finished", old_format: bool = False) -> list[dict]:
    """A micro-sized run after the schema. stop: finished | halted_phase1 | halted_transition2 | running (in
    phase 1, no outcome yet). old_format: train and eval records only, without tokens, FLOPs, routing."""
    s = build_settings("micro", {"growth": {"noise_std": 0.2}})
    recs = [{"kind": "start", "global_step": 0, "time": T0, "preset": "micro", "device": "cpu", "world_size": 1,
             "precision": "fp32", "data": "generated stories <NOT TinyStories>", "train_tokens": TRAIN_TOKENS,
             "val_tokens": 6_789, "settings": s.to_dict(), "preset_settings": build_settings("micro").to_dict(),
             "resumed": False}]
    g, tokens, flops, t, loss, last_eval = 0, 0, 0.0, T0, 6.0, None

    def progress() -> dict:
        return {} if old_format else {"tokens": tokens, "flops": flops, "epochs": tokens / TRAIN_TOKENS}

    for index, (phase, steps) in enumerate(PHASES.items()):
        if index:  # transition into this phase: checks, then the grown model's step-0 eval on the same point
            passed = not (stop == "halted_transition2" and index == 2)
            recs.append({"kind": "transition", "index": index, "stage": phase, "title": f"growth into {phase}",
                         "global_step": g, "tokens": tokens, "flops": flops, "time": t, "passed": passed,
                         "loss_before": last_eval, "loss_after": last_eval + 2e-7 if passed else None,
                         "checks": transition_checks(index, passed)})
            if not passed:
                recs.append({"kind": "outcome", "status": "halted", "global_step": g, "time": t, "seconds": t - T0,
                             "message": "transition 2 failed the symmetry check(s); see the summary above."})
                return recs
            last_eval += 2e-7
        evals = 0
        for step in range(0, steps + 1):
            if step:
                g, tokens, t = g + 1, tokens + TOKENS_PER_STEP, t + 0.5
                flops += 6 * PARAMS[phase] * TOKENS_PER_STEP
                loss = 2.3 + 3.7 * math.exp(-g / 25)
            if step and step % 5 == 0:
                recs.append({"kind": "train", "phase": phase, "step": step, "global_step": g, "loss": loss + 0.05,
                             "lr": 1e-3, "time": t, "tokens_per_s": 1024.0, "tokens_per_s_per_process": 1024.0,
                             "mfu": None, **progress(), **({"balance": 1.02} if phase != "dense" else {})})
            if step % 10 == 0:  # step 0 of a grown phase: the grown model on the old model's last eval
                if step or not index:
                    last_eval = FINAL_EVAL if (phase == "grown" and step == steps) else loss
                r = {"kind": "eval", "phase": phase, "step": step, "global_step": g, "loss": last_eval, "time": t,
                     **progress()}
                if phase != "dense" and not old_format:
                    r["routing"] = routing(index, evals, LAYERS[phase], dead_layer=3 if phase == "grown" else None)
                if phase == "grown" and not old_format:
                    d = 1e-8 + 2e-4 * step
                    r["clone_divergence"] = {"attention_heads": d, "ffn_neurons": 1.5 * d, "residual": 0.8 * d,
                                             "min": 0.8 * d, "attention_heads_raw": 0.42}
                recs.append(r)
                evals += 1
            if stop == "running" and phase == "dense" and step == 20:
                return recs
            if stop == "halted_phase1" and phase == "dense" and step == 20:
                recs.append({"kind": "outcome", "status": "halted", "global_step": g, "time": t, "seconds": t - T0,
                             "message": "loss became nan at dense step 20; lower the learning rate (--dense_lr)"})
                return recs
        recs.append({"kind": "sample", "phase": phase, "global_step": g, "time": t, "prompt": "Once upon a time",
                     "text": f"Once upon a time the {phase} model wrote {SCRIPT} & ran home."})
    recs.append({"kind": "outcome", "status": "finished", "message": "", "global_step": g, "time": t,
                 "seconds": t - T0})
    if old_format:
        recs = [r for r in recs if r["kind"] in ("train", "eval")]
    return recs


def write_run(path, records: list[dict], side_files: bool = True, truncate: bool = False) -> str:
    path.mkdir(exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if truncate:  # a killed process's half-written last line
        text += json.dumps({"kind": "train", "phase": "grown", "loss": 1.0})[:25]
    (path / "metrics.jsonl").write_text(text)
    if side_files:
        (path / "settings.json").write_text(json.dumps(records[0].get("settings", {}), indent=1))
        (path / "data_source.json").write_text(json.dumps({"origin": "generated"}))
    return str(path)


def section(page: str, anchor: str) -> str:
    m = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert m, f"section {anchor} missing"
    return m.group(1)


def images(page: str) -> list[bytes]:
    """Every <img> must be an inline PNG; returns the decoded files."""
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) == page.count("<img "), "an <img> without a src"
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert min(Image.open(io.BytesIO(png)).size) > 50
        out.append(png)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[str, list[dict], str]:
    records = synthetic_records()
    out = write_run(tmp_path_factory.mktemp("finished"), records)
    path = write_report(out, PIPELINE)
    return path, records, open(path, encoding="utf-8").read()


# ------------------------------------------------------------------------------------------ page content
@pytest.mark.slow
def test_every_section_shows_the_records_numbers(finished):
    path, records, page = finished
    assert os.path.basename(path) == "report.html"
    summary = section(page, "summary")
    for text in ("generated stories &lt;NOT TinyStories&gt;", "123,456", "6,789", "cpu", "1 process", "fp32",
                 "micro", "finished", "growth.noise_std", "0.2", "0.3", "2026-01-01 00:00:00 UTC", "35 s"):
        assert text in summary, text
    tokens = 70 * TOKENS_PER_STEP
    assert f"{tokens:,} tokens" in summary and f"{tokens / TRAIN_TOKENS:.4g} epochs" in summary
    assert "growth.scale_factor" not in summary.split("</details>")[0].split("<details>")[0]  # unchanged: not listed
    assert "2.346" in summary  # the final eval loss, per phase
    checks = section(page, "checks")
    assert checks.count("<tr>") == 1 + 3 + 1 + 5  # header + 3 checks, header + 5 checks
    for text in ("3.1e-07", "≤ 1e-05", "0.0421", "≥ 0.001", "Symmetry breaking", "max attention-probability drift"):
        assert text in checks, text
    assert checks.count('class="fail"') == 0 and checks.count('class="pass"') == 2 + 8
    assert len(images(section(page, "loss"))) == 2  # against FLOPs and against tokens
    routing = section(page, "routing")
    assert len(images(routing)) == 4  # heatmap and entropy for each MoE phase
    assert "Phase 2: MoE" in routing and "Phase 3: grown MoE" in routing
    dead_rows = re.findall(r"<tr><td>layer 3</td>(.*?)</tr>", routing)
    assert dead_rows and '<td class="num">1</td>' in dead_rows[-1]  # the expert that died in grown layer 3
    divergence = section(page, "divergence")
    assert len(images(divergence)) == 1 and "clones keep diverging" in divergence
    assert section(page, "samples").count('<pre class="story">') == 3
    assert 'class="absent"' not in page  # nothing missing in a finished run


@pytest.mark.slow
def test_text_from_the_files_stays_text(finished):
    _, _, page = finished
    assert "<script" not in page.lower()  # the sample story's script tag is escaped, and the page has none
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in section(page, "samples")
    assert "<b>" not in page and "raise noise_std &lt;b&gt;&amp; more&lt;/b&gt;" not in page  # passed: no fix shown
    assert "http://" not in page and "https://" not in page and "src=\"file:" not in page


@pytest.mark.slow
def test_a_failed_transition_shows_its_fix_escaped_and_the_halt(tmp_path):
    page = render_report(write_run(tmp_path, synthetic_records("halted_transition2")), PIPELINE)
    checks = section(page, "checks")
    assert checks.count('class="fail"') == 2  # the transition and its symmetry check
    assert "raise noise_std &lt;b&gt;&amp; more&lt;/b&gt;" in checks and "<b>" not in checks
    assert "halted: transition 2 failed the symmetry check(s)" in section(page, "summary")
    assert "no clone-divergence records" in section(page, "divergence")
    assert section(page, "samples").count('<pre class="story">') == 2  # phases 1 and 2


def test_a_run_halted_in_phase_1_says_what_is_absent_in_one_line_each(tmp_path):
    page = render_report(write_run(tmp_path, synthetic_records("halted_phase1")), PIPELINE)
    assert "halted: loss became nan at dense step 20" in section(page, "summary")
    for anchor, words in (("checks", "no transition records"), ("routing", "no routing records"),
                          ("divergence", "no clone-divergence records"), ("samples", "no sample stories")):
        body = section(page, anchor)
        assert body.count('class="absent"') == 1 and words in body, anchor
        assert "<img" not in body
    assert len(images(section(page, "loss"))) == 2


def test_a_running_run_is_not_called_finished(tmp_path):
    page = render_report(write_run(tmp_path, synthetic_records("running")), PIPELINE)
    summary = section(page, "summary")
    assert "no outcome recorded: still running" in summary and "finished" not in summary


def test_an_old_run_without_tokens_start_or_outcome_is_plotted_against_steps(tmp_path):
    page = render_report(write_run(tmp_path, synthetic_records(old_format=True), side_files=False), PIPELINE)
    loss = section(page, "loss")
    assert len(images(loss)) == 1 and "carry no tokens or FLOPs" in loss
    summary = section(page, "summary")
    assert "no start record" in summary and "settings.json is missing" in summary
    assert "data_source.json is missing" in summary and "no settings recorded" in summary


@pytest.mark.slow
def test_broken_files_do_not_crash(tmp_path):
    records = synthetic_records()
    records[5]["loss"] = None  # a train record with no loss
    evals = [r for r in records if r.get("routing")]
    evals[0]["routing"] = {"load": [[0.5, "x"], 3], "entropy": "?"}  # no (layers, experts) table: skipped
    evals[1]["routing"] |= {"entropy": 5, "dead": "x"}  # a load table but no per-layer lists: drawn without them
    next(r for r in records if r["kind"] == "sample")["text"] = None
    next(r for r in records if r.get("clone_divergence"))["clone_divergence"] = {"min": "?", "residual": None}
    next(r for r in records if r["kind"] == "transition")["checks"] = {"functional": "not a record"}
    out = write_run(tmp_path, records, truncate=True)
    (tmp_path / "settings.json").write_text("{ not json")
    page = render_report(out, PIPELINE)
    assert "settings.json is unreadable" in page and "unreadable check record" in page
    assert len(images(section(page, "routing"))) == 4  # the malformed eval is skipped, the rest drawn
    os.remove(tmp_path / "metrics.jsonl")
    page = render_report(out, PIPELINE)
    assert "metrics.jsonl is missing" in page and "nothing to plot" in page
    with pytest.raises(FileNotFoundError, match="no run directory .*: pass the --out-dir of a run"):
        write_report(str(tmp_path / "nowhere"), PIPELINE)


def test_write_report_is_atomic_and_replaces_the_old_page(tmp_path):
    out = write_run(tmp_path, synthetic_records("halted_phase1"))
    (tmp_path / "report.html").write_text("old")
    path = write_report(out, PIPELINE)
    assert open(path).read().startswith("<!DOCTYPE html>")
    assert sorted(os.listdir(tmp_path)) == ["data_source.json", "metrics.jsonl", "report.html", "settings.json"]


# ------------------------------------------------------------------------------- the loss plot's x axis
@pytest.mark.parametrize("x,label,last", [("step", "global step", 70), ("tokens", "tokens", 70 * TOKENS_PER_STEP),
                                          ("flops", "FLOPs", None)])
def test_loss_plot_against_steps_tokens_or_flops(x, label, last):
    records = synthetic_records()
    fig = loss_figure(records, PIPELINE, x)
    ax = fig.axes[0]
    assert label in ax.get_xlabel() and "carry no" not in ax.get_xlabel()
    xs = np.concatenate([line.get_xdata() for line in ax.get_lines()])
    flops = next(r["flops"] for r in reversed(records) if r["kind"] == "eval")
    assert xs.max() == pytest.approx(last if last is not None else flops)


def test_each_transition_is_one_ringed_eval_point():
    records = synthetic_records()
    ax = loss_figure(records, PIPELINE, "tokens").axes[0]
    rings = [line for line in ax.get_lines() if line.get_markersize() == 12]
    at = [r["tokens"] for r in records if r["kind"] == "transition"]
    assert sorted(float(line.get_xdata()[0]) for line in rings) == at
    for ring, t in zip(rings, (r for r in records if r["kind"] == "transition")):
        assert float(ring.get_ydata()[0]) == pytest.approx(t["loss_before"], abs=1e-6)  # old and new eval meet


def test_loss_plot_falls_back_to_steps_for_old_records_and_rejects_a_bad_axis(tmp_path):
    old = synthetic_records(old_format=True)
    assert loss_figure(old, PIPELINE, "flops").axes[0].get_xlabel() == "global step (these records carry no flops)"
    with pytest.raises(ValueError, match="x='time' is not an axis of the loss plot: choose one of step, tokens, flops"):
        loss_figure(old, PIPELINE, "time")
    assert plot_losses(old, str(tmp_path / "c.png"), PIPELINE, x="tokens") == str(tmp_path / "c.png")
    assert plot_losses([{"kind": "start", "global_step": 0}], str(tmp_path / "n.png"), PIPELINE) is None


# -------------------------------------------------------------------------------------- headless Chromium
def test_missing_chromium_is_one_line_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(html_report.shutil, "which", lambda name: None)
    with pytest.raises(ChromiumMissing, match="no Chromium on PATH .*apt-get install chromium"):
        screenshot(str(tmp_path / "r.html"), str(tmp_path / "r.png"))


needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="no chromium binary on PATH (apt-get install "
                                    "chromium; .ci/run installs it)")


@pytest.mark.slow
@needs_chromium
def test_chromium_renders_the_report_with_every_image(finished, tmp_path):
    path, _, _ = finished
    png = screenshot(path, str(tmp_path / "report.png"), width=1280, height=2400)
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and plots, not a blank page
    dom = dump_dom(path)
    assert dom.count("<img ") == 7 and len(images(dom)) == 7  # the browser sees every image, all inline PNGs
    assert not re.search(r'(src|href)="(https?:|file:|//)', dom)  # nothing fetched from elsewhere
    assert "<script" not in dom.lower() and "&lt;script&gt;" in dom  # the story's tag stayed text in the DOM


@needs_chromium
def test_chromium_screenshot_of_a_blank_page_is_told_apart(tmp_path):
    """The blank-page test above must be able to fail: an empty page has no variance."""
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    pixels = np.asarray(Image.open(screenshot(str(blank), str(tmp_path / "b.png"), 400, 300)).convert("L"), dtype=float)
    assert pixels.std() < 1

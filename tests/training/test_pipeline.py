"""training/pipeline.py: the stage table is the one place that lists the phases; everything else derives from it."""
import json
import os
import re
from dataclasses import make_dataclass, replace

import pytest
import torch

import training.pipeline as pipeline
import training.stages as stages
from config import TrainConfig
from tests.helpers import ROOT
from training.run_state.checkpoint import list_checkpoints
from training.loop import TrainingState
from training.pipeline import run_pipeline, stage_phase
from training.settings import RunRequest
from training.stages import PIPELINE, Stage, stage_index
from training.parallel.runtime import Runtime
from training.settings import build_settings, parse_overrides
from transfer import detailed_growth_check, grown_config, scale_bilaterally

pytestmark = pytest.mark.usefixtures("offline")


def test_stage_phases_read_their_settings_by_name_and_only_the_last_decays():
    s = build_settings("micro")
    phases = [stage_phase(st, s, last=i == len(PIPELINE) - 1) for i, st in enumerate(PIPELINE)]
    assert [(p.steps, p.lr) for p in phases] == [(getattr(s.train, f"{st.name}_steps"), getattr(s.train, f"{st.name}_lr"))
                                                for st in PIPELINE]
    assert [p.decays for p in phases] == [False] * (len(PIPELINE) - 1) + [True]
    s = build_settings("micro", parse_overrides(["--decay=every_phase"]))
    assert all(stage_phase(st, s, last=False).decays for st in PIPELINE)
    assert [stage_index(st.name) for st in PIPELINE] == list(range(len(PIPELINE)))
    assert PIPELINE[0].grow is None and all(st.grow and st.check for st in PIPELINE[1:])


def test_every_stage_has_its_settings():
    fields = set(TrainConfig.__dataclass_fields__)
    for st in PIPELINE:
        assert {f"{st.name}_steps", f"{st.name}_lr"} <= fields


def test_no_other_module_lists_the_phases():
    """grep: the stage names as a sequence appear only in the stage table (settings named after them aside)."""
    names = [st.name for st in PIPELINE]
    listing = re.compile(r"""["']%s["'][\s\S]{0,300}["']%s["'][\s\S]{0,300}["']%s["']""" % tuple(names[:3]))
    offenders = []
    for folder, _, files in os.walk(ROOT):
        if any(part in folder for part in (".ci", ".venv", "tests", ".git", "results")):
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                text = open(path, encoding="utf-8").read()
                if listing.search(text) or re.search(r"range\(\w+, 3\)|index == 1\b", text):
                    offenders.append(os.path.relpath(path, ROOT))
    assert offenders == ["training/stages.py"]


def test_training_state_round_trips_and_begins_a_phase():
    st = TrainingState("moe", 7, False, 37, {"dense": 3.5}, {"step": 37, "seed": 1})
    copy = TrainingState()
    copy.load_state_dict(json.loads(json.dumps(st.state_dict())))
    assert copy == st
    copy.begin("grown")
    assert (copy.phase, copy.step, copy.phase_done, copy.global_step) == ("grown", 0, False, 37)


@pytest.mark.slow
def test_a_fourth_stage_is_one_entry_plus_its_settings(tmp_path, monkeypatch, capsys):
    """A second growth (one more identity block, width kept) added to the table runs end to end, checked."""
    def deepen(model, s, calibration):
        return scale_bilaterally(model, 1, 1, s.growth.noise_std, s.run.seed, calibration_tokens=calibration)

    extra = Stage("deeper", "Phase 4: deeper MoE", "Phase 4: deeper", grow=deepen, check=detailed_growth_check,
                  describe=lambda s: "one more block", config=lambda c, s: grown_config(c, 1, 1), transition="deeper")
    monkeypatch.setattr(stages, "PIPELINE", PIPELINE + (extra,))  # the one table every module reads
    Train4 = make_dataclass("Train4", [("deeper_steps", int, 10), ("deeper_lr", float, 1e-4)], bases=(TrainConfig,))
    s = build_settings("micro", parse_overrides(["--dense_steps=10", "--moe_steps=6", "--grown_steps=6",
                                                 "--checkpoint_interval=5", "--eval_interval=5"]))
    s = replace(s, train=Train4(**{k: getattr(s.train, k) for k in TrainConfig.__dataclass_fields__}))
    out = pipeline.run_pipeline(RunRequest(s, str(tmp_path)), Runtime(torch.device("cpu")))
    assert out.status == "finished" and list(out.state.eval_losses) == ["dense", "moe", "grown", "deeper"]
    text = capsys.readouterr().out
    assert "TRANSITION 3: one more block" in text and "Phase 4: deeper" in text and "3 transitions verified" in text
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs if r.get("phase") == "deeper" and r["kind"] == "eval"] == [0, 5, 10]
    done = [c.phase for c in list_checkpoints(str(tmp_path / "checkpoints")) if c.meta["phase_done"]]
    assert done == ["dense", "moe", "grown", "deeper"]
    assert os.path.getsize(tmp_path / "loss_curve.png") > 10_000


def test_bad_fourth_stage_settings_are_validated_like_the_others():
    Train4 = make_dataclass("Train4", [("deeper_steps", int, 0), ("deeper_lr", float, 1e-4)], bases=(TrainConfig,))
    with pytest.raises(ValueError, match="deeper_steps=0 must be >= 1"):
        Train4()


@pytest.mark.slow
def test_run_pipeline_returns_its_state_and_a_finished_run_is_recognised(tmp_path):
    s = build_settings("micro", parse_overrides(["--dense_steps=6", "--moe_steps=4", "--grown_steps=4",
                                                 "--eval_interval=2", "--checkpoint_interval=2"]))
    rt = Runtime(torch.device("cpu"))
    out = run_pipeline(RunRequest(s, str(tmp_path)), rt)
    assert out.status == "finished" and out.state.global_step == 14 and out.state.phase_done
    assert out.state.data_position["step"] == 14
    again = run_pipeline(RunRequest(s, str(tmp_path), resume=True), rt)
    assert again.status == "already_finished" and again.state == out.state


def _pure_clone_pipeline(monkeypatch):
    """The growth stage made to grow pure clones (noise 0) with its check bypassed, as a broken growth would."""
    last = PIPELINE[-1]

    def clones(model, s, calibration):
        return scale_bilaterally(model, s.growth.scale_factor, s.growth.extra_layers, 0.0, s.run.seed)

    def passes(old, new, tokens, **used):
        return type("Report", (), {"passed": True, "results": {}})()

    monkeypatch.setattr(stages, "PIPELINE", PIPELINE[:-1] + (replace(last, grow=clones, check=passes),))


WATCHED = ["--dense_steps=6", "--moe_steps=4", "--grown_steps=40", "--eval_interval=10", "--checkpoint_interval=20"]


@pytest.mark.slow
def test_clone_divergence_is_logged_at_every_eval_of_the_grown_stage(tmp_path):
    s = build_settings("micro", parse_overrides(WATCHED))
    assert run_pipeline(RunRequest(s, str(tmp_path)), Runtime(torch.device("cpu"))).status == "finished"
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    watched = [r for r in recs if "clone_divergence" in r]
    assert [r["step"] for r in watched] == [10, 20, 30, 40] and all(r["kind"] == "eval" for r in watched)
    assert {r["phase"] for r in watched} == {PIPELINE[-1].name}
    first, last = watched[0]["clone_divergence"], watched[-1]["clone_divergence"]
    assert last["min"] > first["min"] > 0  # noisy clones keep moving apart


@pytest.mark.slow
def test_pure_clones_are_warned_about_and_halt_when_asked(tmp_path, monkeypatch, capsys):
    _pure_clone_pipeline(monkeypatch)
    s = build_settings("micro", parse_overrides(WATCHED))
    rt = Runtime(torch.device("cpu"))
    assert run_pipeline(RunRequest(s, str(tmp_path / "warn")), rt).status == "finished"
    out = capsys.readouterr().out
    assert out.count("⚠ WARNING at grown step") == 2 and "cloned units have not diverged" in out  # evals 3 and 4
    recs = [json.loads(line) for line in open(tmp_path / "warn" / "metrics.jsonl")]
    assert all(r["clone_divergence"]["min"] == 0.0 for r in recs if "clone_divergence" in r)

    s = build_settings("micro", parse_overrides(WATCHED + ["--halt_on_relock"]))
    outcome = run_pipeline(RunRequest(s, str(tmp_path / "halt")), rt)
    assert outcome.status == "halted" and outcome.state.step == 30
    out = capsys.readouterr().out
    assert "✗ HALTED: cloned units have not diverged" in out and "--resume --grown_lr=" in out
    assert list_checkpoints(str(tmp_path / "halt" / "checkpoints"))[-1].meta["step"] == 30  # the steps are kept


@pytest.mark.slow
def test_a_stages_checks_step_at_that_stages_first_lr_and_the_record_says_so(tmp_path):
    """The checks take the run's settings: micro's grown stage steps at grown_lr / warmup_steps = 3e-4 / 5, and the
    objective's coefficients are the run's (here changed from the defaults)."""
    s = build_settings("micro", parse_overrides(["--dense_steps=4", "--moe_steps=4", "--grown_steps=4",
                                                 "--eval_interval=4", "--checkpoint_interval=4", "--z_coef=0.002"]))
    assert run_pipeline(RunRequest(s, str(tmp_path)), Runtime(torch.device("cpu"))).status == "finished"
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    used = {r["stage"]: r["checks_used"] for r in records if r["kind"] == "transition"}
    assert used["grown"]["lr"] == pytest.approx(s.train.grown_lr / s.train.warmup_steps) == pytest.approx(6e-5)
    assert used["moe"]["lr"] == pytest.approx(s.train.moe_lr / s.train.warmup_steps)
    assert used["grown"]["z_coef"] == 0.002 and used["grown"]["balance_coef"] == s.train.balance_coef
    grown = [r for r in records if r["kind"] == "transition" and r["stage"] == "grown"][0]
    assert "6e-05" in json.dumps(grown["checks"]["trainability"]) or "6.0e-05" in json.dumps(grown["checks"]["trainability"])

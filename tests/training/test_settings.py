"""training/settings.py: presets, saved settings, and the one command-line parser of every script."""
import subprocess
import sys
from dataclasses import fields

import pytest

import bench.growth_vs_scratch
import test_growth_checks
import train_tinystories
from config import PRESETS, ConfigError
from tests.helpers import ROOT
from training.settings import (NOT_SETTINGS, SECTIONS, Settings, build_settings, find_setting, make_parser,
                               parse_command_line, parse_overrides, settings_table)



def test_presets_build_valid_settings_and_overrides_win():
    for name in PRESETS:
        s = build_settings(name)
        assert s.train.seq_len <= s.model.max_seq_len and s.model.n_experts == 0
    s = build_settings("micro", parse_overrides(["--noise_std=0.1", "--n_experts=8", "--seed=7"]))
    assert (s.growth.noise_std, s.growth.n_experts, s.run.seed, s.model.dim) == (0.1, 8, 7, 64)


def test_settings_round_trip_through_a_dict_and_old_fields_are_dropped():
    s = build_settings("micro")
    assert Settings.from_dict(s.to_dict()) == s
    old = s.to_dict()
    old["growth"]["seed"] = 0  # a field an earlier version saved
    assert Settings.from_dict(old) == s


def test_resume_keeps_the_model_but_allows_growth_and_training_knobs():
    saved = build_settings("micro").to_dict()
    s = build_settings(None, parse_overrides(["--noise_std=0.5", "--grown_steps=99"]), saved)
    assert s.growth.noise_std == 0.5 and s.train.grown_steps == 99 and s.model.dim == 64
    with pytest.raises(ConfigError, match="cannot change on --resume"):
        build_settings(None, parse_overrides(["--dim=128"]), saved)


@pytest.mark.parametrize("args, text", [
    (["--seq_len=500"], "exceeds max_seq_len"), (["--vocab_size=100"], ">= 257"),
    (["--vocab_size=70000"], "<= 65536"), (["--device=tpu"], "device='tpu'"),
])
def test_cross_section_rules(args, text):
    with pytest.raises(ConfigError, match=text):
        build_settings("micro", parse_overrides(args))


@pytest.mark.parametrize("tokens", [
    ["--noise_std=0.2"], ["--noise_std", "0.2"], ["--noise-std=0.2"], ["--noise-std", "0.2"],
    ["--growth.noise_std=0.2"], ["--growth.noise-std", "0.2"],
])
def test_every_spelling_of_a_setting_is_accepted(tokens):
    assert parse_overrides(tokens) == {"growth": {"noise_std": 0.2}}


def test_values_take_the_fields_types():
    got = parse_overrides(["--dim", "64", "--tie_embeddings=false", "--n_kv_heads=none", "--compile",
                           "--grad-clip", "-1", "--decay", "every_phase", "--ffn_dim=96"])
    assert got == {"model": {"dim": 64, "tie_embeddings": False, "n_kv_heads": None, "ffn_dim": 96},
                   "run": {"compile": True}, "train": {"grad_clip": -1.0, "decay": "every_phase"}}
    assert isinstance(got["train"]["grad_clip"], float)
    assert parse_overrides(["--compile", "false"]) == {"run": {"compile": False}}


@pytest.mark.parametrize("tokens, text", [
    (["--noise_sdt=0.1"], "unknown setting --noise_sdt; did you mean --noise_std?"),
    (["--growth.noise_sdt=0.1"], "did you mean --growth.noise_std?"),
    (["--zzzz=1"], "unknown setting --zzzz; --help lists every setting"),
    (["--optim.lr=1"], "unknown section in --optim.lr"),
    (["--model.n_experts=4"], "phase 1 is dense; set the MoE with --growth.n_experts"),
    (["--dim=abc"], "--dim=abc: expected an integer"),
    (["--n_kv_heads=two"], "expected an integer or none"),
    (["--tie_embeddings=maybe"], "expected true or false"),
    (["--dim"], "--dim needs a value"),
    (["--dim", "--n_layers=2"], "--dim needs a value"),
    (["dim=3"], "unexpected argument 'dim=3'"),
    (["--scale_factor=1.5"], "expected an integer"),
])
def test_bad_settings_are_one_clear_error(tokens, text):
    with pytest.raises(ConfigError) as e:
        build_settings(None, parse_overrides(tokens))
    assert text in str(e.value) and "\n" not in str(e.value)


def test_a_name_two_sections_share_is_refused_naming_both_qualified_forms():
    table = settings_table()
    twin = [s for s in table if s.qualified == "run.seed"][0]
    shared = table + [type(twin)("growth", "seed", "int", 0, "a second seed")]
    with pytest.raises(ConfigError, match=r"--seed is ambiguous: .* write --run.seed or --growth.seed"):
        find_setting("seed", shared)
    assert find_setting("growth.seed", shared).section == "growth"
    assert find_setting("run.seed", shared).section == "run"


@pytest.mark.slow
def test_no_setting_name_is_ambiguous_today_and_each_has_a_doc():
    table = settings_table()
    names = [s.name for s in table]
    assert len(names) == len(set(names)), "a name two sections share would make --name ambiguous"
    assert all(s.doc for s in table), [s.qualified for s in table if not s.doc]
    every = {(sec, f.name) for sec, cls in SECTIONS.items() for f in fields(cls)}
    assert {(s.section, s.name) for s in table} == every - NOT_SETTINGS
    for name in PRESETS.values():  # every preset key resolves to exactly one setting
        for key in name:
            find_setting(key)


def test_script_options_take_hyphens_or_underscores_and_mix_with_settings():
    p = make_parser("x")
    p.add_argument("--data-files", nargs="+")
    p.add_argument("--resume", action="store_true")
    args, overrides = parse_command_line(p, ["--data_files", "a.txt", "b.txt", "--noise-std", "0.2", "--resume",
                                             "--seed", "3"])
    assert args.data_files == ["a.txt", "b.txt"] and args.resume
    assert overrides == {"growth": {"noise_std": 0.2}, "run": {"seed": 3}}
    with pytest.raises(ConfigError, match="expected one argument|expected at least one argument"):
        parse_command_line(p, ["--data-files"])


def test_help_lists_every_setting_by_section_with_default_and_doc(capsys):
    with pytest.raises(SystemExit) as e:
        train_tinystories.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--data-files" in out and "--resume" in out
    for section in SECTIONS:
        assert f"\n  {section}: " in out
    for s in settings_table():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"--{s.name} "))
        assert str(s.default) in line and s.doc[:30] in line


@pytest.mark.parametrize("main", [train_tinystories.main, test_growth_checks.main, bench.growth_vs_scratch.main])
def test_every_script_uses_the_same_parser(main, capsys):
    assert main(["--noise_sdt=0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown setting --noise_sdt; did you mean --noise_std?\n"
    with pytest.raises(SystemExit):
        main(["-h"])
    assert "--growth.noise_std" not in capsys.readouterr().err


@pytest.mark.slow
def test_help_runs_as_printed_from_the_shell():
    out = subprocess.run([sys.executable, "train_tinystories.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "noise_std" in out.stdout and out.stderr == ""

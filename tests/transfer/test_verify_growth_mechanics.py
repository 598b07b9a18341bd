"""Tests of transfer/verify_growth_mechanics.py, the import path users know: it hands out transfer/checks' own
objects under their names, and `detailed_growth_check(old, new, tokens)` as its docstring shows it prints the
VERIFICATION SUMMARY (all five passed; one failed with its fix; nothing when verbose=False).

Each check is tested beside its module against broken and correct growths (tests/transfer/checks/: the no-false-alarm
grid and the contracts in test_checks_suite_grid.py, each check's broken growths in test_checks_<check>_mutations.py).

    .venv/bin/python -m pytest tests/transfer/test_verify_growth_mechanics.py -q
"""
import pytest
import torch

import transfer.checks as checks
import transfer.verify_growth_mechanics as facade
from tests.growth_pairs import pure_clone, source, story_tokens
from transfer.simple_growth import scale_bilaterally
from transfer.verify_growth_mechanics import FIX_SYMMETRY, detailed_growth_check

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return story_tokens(4, 64)


def test_the_facade_hands_out_the_checks_own_objects():
    assert facade.__all__ and set(facade.__all__) <= set(checks.__all__)
    for name in facade.__all__:
        assert getattr(facade, name) is getattr(checks, name), name
    assert {"detailed_growth_check", "upcycling_check", "check_trainability"} <= set(facade.__all__)


def test_summary_printed_on_success(tokens, capsys):
    old = source("dense")
    new = scale_bilaterally(old, 2, 1)
    rep = detailed_growth_check(old, new, tokens)
    out = capsys.readouterr().out
    assert rep.passed
    assert "VERIFICATION SUMMARY" in out
    assert "✓ ALL CHECKS PASSED" in out
    assert "Model is ready for Phase 3 training." in out
    assert out.count("✓ PASSED") == 5 and "✗" not in out
    assert rep.summary() in out


def test_summary_printed_on_failure(tokens, capsys):
    old = source("dense")
    bad = pure_clone(old, 2, 1)
    rep = detailed_growth_check(old, bad, tokens)
    out = capsys.readouterr().out
    assert not rep.passed
    assert "VERIFICATION SUMMARY" in out
    assert "✗ FAILED  Symmetry breaking" in out
    assert "✗ 1 CHECK(S) FAILED: symmetry" in out
    assert f"  - symmetry: {FIX_SYMMETRY}" in out
    assert out.count("✓ PASSED") == 4
    assert "ALL CHECKS PASSED" not in out and "ready for Phase 3" not in out


def test_verbose_false_prints_nothing(tokens, capsys):
    old = source("dense")
    detailed_growth_check(old, pure_clone(old, 2, 0), tokens, verbose=False)
    assert capsys.readouterr().out == ""

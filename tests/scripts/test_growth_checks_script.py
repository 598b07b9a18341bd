"""The user's quick check, `python test_growth_checks.py`, run in-process on a small config."""
import pytest

import test_growth_checks

SMALL = ["--vocab_size=300", "--dim=64", "--n_layers=2", "--n_heads=4", "--n_experts=4", "--extra_layers=2",
         "--steps=5"]


@pytest.mark.slow
def test_quick_check_passes_and_prints_both_tests(capsys):
    assert test_growth_checks.main(SMALL) == 0
    out = capsys.readouterr().out
    assert "TEST 1: Dense -> MoE" in out and "✓ PASSED — functional equivalence confirmed" in out
    assert "TEST 2: Bilateral growth" in out and "VERIFICATION SUMMARY" in out
    assert "✓ ALL CHECKS PASSED" in out and "Model is ready for Phase 3 training." in out


@pytest.mark.slow
def test_quick_check_with_zero_noise_fails_on_symmetry(capsys):
    assert test_growth_checks.main(SMALL + ["--noise_std=0"]) == 1
    out = capsys.readouterr().out
    assert "✗ FAILED  Symmetry breaking" in out and "raise noise_std" in out


@pytest.mark.parametrize("arg", ["--bogus=1", "--scale_factor=0", "--top_k=9"])
def test_quick_check_bad_settings_exit_2_before_work(arg, capsys):
    assert test_growth_checks.main(SMALL + [arg]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and "TEST 1" not in captured.out


@pytest.mark.slow
def test_quick_check_reads_a_text_file(tmp_path, capsys):
    story = tmp_path / "stories.txt"
    story.write_text("Once upon a time, a little fox found a red ball in the park. " * 40)
    assert test_growth_checks.main(SMALL + ["--text-file", str(story)]) == 0
    assert test_growth_checks.main(SMALL + ["--text-file", str(tmp_path / "missing.txt")]) == 2

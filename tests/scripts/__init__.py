"""Tests of the entry scripts at the repository root (train_tinystories.py, evaluate.py, sample.py, verify_growth.py,
test_growth_checks.py): end to end, crash and resume, bad input."""

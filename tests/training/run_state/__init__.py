"""Tests of training/run_state/: checkpoints, the run's lock, reading a run directory as data only."""

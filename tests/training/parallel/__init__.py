"""Tests of training/parallel/: FSDP2 on CPU processes, a dead launcher or rank, and the CUDA-only tests."""

"""Tests of models/: the model, its MoE layer and generation."""

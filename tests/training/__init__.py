"""Tests of training/: the stage table and pipeline, the loop, settings, plan and roofline."""

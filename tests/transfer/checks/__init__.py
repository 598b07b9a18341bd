"""Tests of transfer/checks/: each growth check against broken and correct growths, one file per module."""

"""Tests of common/: guarded writes and free-space checks at every write site, the formatters."""

"""Tests of training/reporting/: metrics.jsonl and the console header, plots, report.html, TensorBoard."""

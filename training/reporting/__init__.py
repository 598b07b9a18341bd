"""What a run shows: metrics.jsonl and the console header (metrics.py), the loss plot, report.html (html_report.py) and
TensorBoard. Imports common/, config and data/; nothing else from training/ but itself."""

"""Training: the stage table and everything that runs it.

    stages.py      the stage table (imports nothing from training/)
    pipeline.py    start point -> for each stage: transition -> train -> sample
    transition.py  grow the previous stage's model, check the pair (transfer.checks), record it
    loop.py        one stage's training loop;  run_data.py  its data;  settings.py  settings, the parser, the request
    plan.py        the plan before any work and the memory pre-flight;  messages.py  what the console says
    costs.py       parameters, FLOPs and a GPU's peak from a config;  roofline.py  the MFU its shapes allow
    scoring.py     loss, perplexity and bits per byte of stories;  inference.py  what sample.py and evaluate.py load
    run_state/     checkpoints, the run's lock, disk needs      parallel/   device, process group, FSDP2
    reporting/     metrics.jsonl, plots, report.html, TensorBoard
Imports common/, config, models, data/ and transfer/; never an entry script.
"""

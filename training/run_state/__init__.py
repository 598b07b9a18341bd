"""A run's state on disk: checkpoints (written atomically, verified, read as data only), the run's lock, and
what the run will write. Imports common/, config, models and data/; nothing else from training/."""

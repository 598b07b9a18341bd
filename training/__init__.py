"""Training machinery: runtime (device, DDP), checkpoints, the per-phase loop, logs and plots."""

"""Where and how a run executes: device, precision, the process group and the peer watch (runtime.py), and
FSDP2 sharding (sharding.py). Imports common/, config and models; nothing else from training/ but itself."""

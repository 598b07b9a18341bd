"""The bottom layer: file and format helpers every other layer may use.

It imports only the standard library, torch and safetensors, never config, models, data, transfer, training or an
entry script, so anything in the project can depend on it.
"""

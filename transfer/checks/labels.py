"""How the checks name places in a grown model, so every message and metric says the same thing."""
from __future__ import annotations

# The parts of a pre-norm block, in forward order: what a local drift is located to.
STAGES = ("attention_norm", "attention", "ffn_norm", "ffn")


def block_label(layout: list[tuple[int, bool]] | None, j: int) -> str:
    """"block j (old block src)" or "block j (inserted identity copy of old block src)"; "block j" without a layout."""
    if layout is None:
        return f"block {j}"
    src, inserted = layout[j]
    return f"block {j} (inserted identity copy of old block {src})" if inserted else f"block {j} (old block {src})"


def parameter_place(name: str, layout: list[tuple[int, bool]] | None) -> tuple[str, str]:
    """("block 3 (old block 1)", "attention.v_proj") for "blocks.3.attention.v_proj.weight"; ("model", "embed")
    for a parameter outside the blocks."""
    parts = name.removesuffix(".weight").split(".")
    if parts[0] == "blocks":
        return block_label(layout, int(parts[1])), ".".join(parts[2:])
    return "model", ".".join(parts)

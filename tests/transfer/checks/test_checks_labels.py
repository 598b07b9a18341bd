"""Tests of transfer/checks/labels.py: how places in a grown model are named."""
from transfer.checks.labels import STAGES, block_label, parameter_place
from transfer.simple_growth import layer_sources


def test_block_labels_follow_the_growth_layout():
    layout = layer_sources(2, 2)  # old 0, inserted copy of 0, old 1, inserted copy of 1
    assert block_label(layout, 0) == "block 0 (old block 0)"
    assert block_label(layout, 3) == "block 3 (inserted identity copy of old block 1)"
    assert block_label(None, 3) == "block 3"


def test_parameter_place_splits_block_and_module():
    layout = layer_sources(2, 2)
    assert parameter_place("blocks.1.attention.v_proj.weight", layout) == (
        "block 1 (inserted identity copy of old block 0)", "attention.v_proj")
    assert parameter_place("blocks.2.ffn.gate_proj", None) == ("block 2", "ffn.gate_proj")
    assert parameter_place("embed.weight", layout) == ("model", "embed")


def test_stages_are_in_forward_order():
    assert STAGES == ("attention_norm", "attention", "ffn_norm", "ffn")

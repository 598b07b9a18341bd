"""Verify a pair grown anywhere: SMALL, and BIG grown from it (wider, deeper, dense -> MoE).

    python verify_growth.py SMALL BIG                      # transformers dirs (Llama, Mistral, Qwen2, Qwen3 and
                                                           # their MoE forms) or this project's checkpoints / run
                                                           # directories, in any combination
    python verify_growth.py SMALL BIG --tokens story.txt   # real text for the checks' batch
    python verify_growth.py SMALL BIG --report pair.html   # and the report page for the pair

Infers the mapping (width factor and head layout from the configs and weights, which BIG blocks copy which SMALL
block and which are inserted, dense -> MoE), prints it, runs the checks and prints the VERIFICATION SUMMARY.
Weights are read with safetensors (a pickle .bin only with torch.load(weights_only=True)); no transformers model
class is instantiated and no remote code runs.

Exit 0: every check passes. 1: a check fails (its diagnosis and fix are printed). 2: not a pair it can judge
(one line why: different vocabularies, a non-integer width factor, an architecture it does not read, ...).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from training.run_state.checkpoint import CheckpointError, find_checkpoint
from common.files import write_atomic
from training.reporting.html_report import render_pair_report
from transfer.checks import detailed_growth_check, upcycling_check
from common.safe_load import UnsafeFile
from transfer.hf_format import FAMILY_NAMES, UnsupportedModel, from_hf, hf_family
from transfer.pair_batch import DEFAULT_TEXT, BatchError, checks_batch
from transfer.pair_mapping import NotAPair, infer_mapping


class CannotJudge(Exception):
    """Exit 2: one line saying why the pair cannot be judged."""


def load_any(path: str) -> tuple[torch.nn.Module, str]:
    """(model, what it is) from a transformers directory, a project checkpoint or a run directory."""
    if not os.path.isdir(path):
        raise CannotJudge(f"{path}: no such directory")
    if os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(os.path.join(path, "meta.json")):
        try:
            model = from_hf(path)
        except UnsupportedModel as e:
            raise CannotJudge(f"unsupported architecture: {e}") from None
        except UnsafeFile as e:
            raise CannotJudge(str(e)) from None
        return model.eval(), f"transformers {FAMILY_NAMES[hf_family(path)]} directory"
    try:
        ckpt, _ = find_checkpoint(path)
        return ckpt.load_model().eval(), f"project checkpoint {os.path.basename(ckpt.path)}"
    except CheckpointError as e:
        raise CannotJudge(f"{e} (nor a transformers directory: no config.json)") from None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("small", help="the model before growth (transformers dir, checkpoint or run directory)")
    p.add_argument("big", help="the model after growth")
    p.add_argument("--tokens", metavar="FILE", help=f"UTF-8 text for the checks' batch (default: {DEFAULT_TEXT})")
    p.add_argument("--report", metavar="HTML", help="also write the report page for the pair here")
    a = p.parse_args(argv)
    try:
        small, small_kind = load_any(a.small)
        big, big_kind = load_any(a.big)
        mapping = infer_mapping(small, big)
        tokens, tokens_note = checks_batch(a.tokens, small.config.vocab_size, small.config.max_seq_len,
                                           (a.big, a.small))  # BIG's tokenizer first
    except (CannotJudge, BatchError, NotAPair) as e:
        print(f"verify_growth: cannot judge this pair: {e}", file=sys.stderr)
        return 2
    print(f"SMALL {a.small}: {small_kind}, {small.num_parameters():,} parameters")
    print(f"BIG   {a.big}: {big_kind}, {big.num_parameters():,} parameters")
    print(mapping.describe())
    print(tokens_note)
    check = upcycling_check if mapping.upcycling else detailed_growth_check
    report = check(small, big, tokens, verbose=False, layout=mapping.layout)
    print(report.summary())
    if a.report:
        records = {k: r.to_record() for k, r in report.results.items()}
        page = render_pair_report(a.small, a.big, mapping.describe(), tokens_note, records, report.passed)
        write_atomic(a.report, page)
        print(f"wrote {a.report}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

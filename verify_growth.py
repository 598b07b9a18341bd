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

from data.synthetic import byte_token_batch, generate_stories
from training.run_state.checkpoint import CheckpointError, find_checkpoint
from common.files import write_atomic
from training.reporting.html_report import render_pair_report
from transfer.checks import detailed_growth_check, upcycling_check
from common.safe_load import UnsafeFile
from transfer.hf_format import FAMILY_NAMES, UnsupportedModel, from_hf, hf_family
from transfer.pair_mapping import NotAPair, infer_mapping

BATCH, MAX_SEQ = 8, 128  # the checks' batch: 8 sequences of up to 128 tokens (RoPE needs >= 16)
DEFAULT_TEXT = "the project's generated children's stories (data/synthetic.py, seed 0)"


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


def _tokenizer(*dirs: str):
    """The tokenizer.json of BIG (or SMALL), if one is there."""
    from tokenizers import Tokenizer

    for d in dirs:
        file = os.path.join(d, "tokenizer.json")
        if os.path.exists(file):
            return Tokenizer.from_file(file), file
    return None, None


def checks_batch(text_file: str | None, vocab: int, max_seq: int, dirs: tuple[str, str]) -> tuple[torch.Tensor, str]:
    """(tokens (BATCH, T), how they were made): --tokens text or the stated default, through the pair's tokenizer
    when it has one, else as UTF-8 bytes (ids mod the vocabulary)."""
    if text_file:
        try:
            text, source = open(text_file, encoding="utf-8").read(), text_file
        except (OSError, UnicodeDecodeError) as e:
            raise CannotJudge(f"cannot read --tokens {text_file}: {e}") from None
    else:
        text, source = " ".join(generate_stories(400, seed=0)), DEFAULT_TEXT
    tok, tok_file = _tokenizer(dirs[1], dirs[0])
    seq = min(max_seq, MAX_SEQ)
    if tok is None:
        if len(text.encode("utf-8")) < BATCH * seq:
            raise CannotJudge(f"--tokens {text_file}: {len(text.encode('utf-8'))} bytes; need {BATCH * seq}")
        return byte_token_batch(text, BATCH, seq) % vocab, f"tokens: {BATCH} x {seq} UTF-8 bytes (mod vocab {vocab}) of {source}"
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    if len(ids) < BATCH * 16:
        raise CannotJudge(f"--tokens {text_file}: {len(ids)} tokens; need at least {BATCH * 16}")
    seq = min(seq, len(ids) // BATCH)
    ids = ids[: BATCH * seq].view(BATCH, seq)
    if int(ids.max()) >= vocab:
        raise CannotJudge(f"{tok_file} gives ids up to {int(ids.max())}, beyond the models' vocabulary {vocab}")
    return ids, f"tokens: {BATCH} x {seq} ids of {source}, tokenized with {tok_file}"


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
        tokens, tokens_note = checks_batch(a.tokens, small.config.vocab_size, small.config.max_seq_len, (a.small, a.big))
    except (CannotJudge, NotAPair) as e:
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

"""What sample.py and evaluate.py load from a finished run: the checkpoint in eval mode with the run's tokenizer, and
the stories to score (data files, or the run's own validation split read again from what it recorded). The scoring
math is training/scoring.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from training.run_state.checkpoint import Checkpoint, CheckpointError, find_checkpoint


@dataclass
class Loaded:
    """A checkpoint ready for inference: its model in eval mode, its run directory and the run's tokenizer."""

    checkpoint: Checkpoint
    run_dir: str
    model: nn.Module
    tokenizer: object  # the run's transformers tokenizer


def load_for_inference(path: str, device: torch.device) -> Loaded:
    """The checkpoint (a checkpoint directory, or a run's newest), in eval mode on device, with the run's tokenizer.

    CheckpointError (one line) when there is no usable checkpoint or no tokenizer that fits it.
    """
    from data.tokenizer import load_tokenizer

    ckpt, run_dir = find_checkpoint(path)
    tok_dir = os.path.join(run_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise CheckpointError(f"{tok_dir}: no tokenizer beside the checkpoints; pass a run directory written by "
                              "train_tinystories.py (or a checkpoint inside one)")
    tokenizer = load_tokenizer(tok_dir)
    vocab = ckpt.meta["model_config"].get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise CheckpointError(f"{tok_dir}: {len(tokenizer)} tokens but the model has vocab_size={vocab}; "
                              "the tokenizer is not this checkpoint's run's")
    return Loaded(ckpt, run_dir, ckpt.load_model(device).eval(), tokenizer)


# ---------------------------------------------------------------- what to score

def file_stories(paths: list[str]) -> tuple[list[str], str]:
    """(every story of the files, a description); DataError (one line) for a bad file."""
    from data.text import read_stories_file, check_files  # read_stories_file: the loader's own parser, without the split

    check_files(paths)
    per_file = [(p, read_stories_file(p)) for p in paths]
    listing = ", ".join(f"{os.path.basename(p)} ({len(s):,} stories)" for p, s in per_file)
    return [s for _, stories in per_file for s in stories], f"local files: {listing}"


def validation_stories(run_dir: str, ckpt: Checkpoint) -> tuple[list[str], str]:
    """(the run's held-out stories, a description), read again from what data_source.json recorded.

    DataError (one line) when the run recorded no source, or its files are gone or changed.
    """
    from data.source import load_source
    from data.text import DataError, load_corpus
    from training.settings import Settings, load_saved_settings

    recorded = load_source(run_dir)
    if recorded is None:
        raise DataError(f"{run_dir}: no data_source.json, so its validation split is unknown; pass the stories to "
                        "score with --data-files")
    origin = recorded["origin"]
    if origin == "prepared":
        return _prepared_validation(recorded)
    saved = load_saved_settings(run_dir) or ckpt.meta.get("settings")
    if not saved:
        raise DataError(f"{run_dir}: no settings.json, so its validation split is unknown; pass the stories to "
                        "score with --data-files")
    settings = Settings.from_dict(saved)
    data, seed = settings.data, settings.run.seed
    files = _recorded_files(recorded) if origin == "files" else None
    corpus = load_corpus(files, data.val_fraction, data.max_stories or None, seed,
                         hub_dataset=recorded.get("dataset", "roneneldan/TinyStories"),
                         offline_stories=data.offline_stories, log=lambda _: None, origin=origin)
    how = f"held out: val_fraction {data.val_fraction}, seed {seed}"
    if origin == "hub":
        how = "its validation split, or held out by seed if it has none"
    return corpus.val, f"validation stories of the run's data ({how}) from {corpus.source}"


def _recorded_files(recorded: dict) -> list[str]:
    """The run's data files, checked against their recorded size and SHA-256 (else another split)."""
    from common.files import sha256_file
    from data.text import DataError

    for f in recorded["files"]:
        if not os.path.isfile(f["path"]):
            raise DataError(f"the run's data file {f['path']} is gone, so its validation split cannot be rebuilt; "
                            "put it back, or score other stories with --data-files")
        if os.path.getsize(f["path"]) != f["bytes"] or sha256_file(f["path"]) != f["sha256"]:
            raise DataError(f"{f['path']} changed since the run read it (SHA-256 was {f['sha256'][:12]}...), so its "
                            "validation split cannot be rebuilt; restore it, or score other stories with --data-files")
    return [f["path"] for f in recorded["files"]]


def _prepared_validation(recorded: dict) -> tuple[list[str], str]:
    """The validation stories of the run's prepared dataset (data/prepared.py), checked by its fingerprint."""
    from data.text import DataError

    try:
        from data.prepared import open_prepared
    except ImportError:
        raise DataError(f"this run trained on a prepared dataset ({recorded.get('path')}) but data/prepared.py is not "
                        "in this checkout; update it, or score other stories with --data-files") from None
    path, want = recorded["path"], recorded.get("fingerprint")
    prepared = open_prepared(path)  # DataError: gone, incomplete or damaged
    if want and prepared.fingerprint != want:
        raise DataError(f"{path} holds other data (fingerprint {prepared.fingerprint[:12]}...) than this run "
                        f"trained on ({want[:12]}...), so its validation split is not the run's; score it with "
                        "--data-files")
    return prepared.val_stories(), f"validation stories of the prepared dataset {path}"

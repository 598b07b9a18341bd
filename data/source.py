"""What a run trained on, recorded in the run directory so that `--resume` needs nothing but the run.

    out_dir/data_source.json   {"origin": "files", "files": [{"path", "bytes", "sha256"}, ...]}
                               {"origin": "hub", "dataset": "roneneldan/TinyStories"} | {"origin": "generated"}
                               {"origin": "prepared", "path": DIR, "fingerprint": ..., "source": {...}}

A resume reads the same source again: the recorded files (or, given --data-files, files with the same
contents, wherever they now are), the hub without falling back, or the generated stories without asking the
hub. Different data is refused before any work, naming what differs.
"""
from __future__ import annotations

import os

from common.files import read_json, sha256_file
from data.text import DataError, check_files

SOURCE_FILE = "data_source.json"


def describe_files(paths: list[str]) -> list[dict]:
    return [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)} for p in paths]


def source_record(origin: str, data_files: list[str] | None, hub_dataset: str = "roneneldan/TinyStories") -> dict:
    """The record of a source that was read: origin as Corpus.origin reports it."""
    if origin == "files":
        return {"origin": "files", "files": describe_files(data_files or [])}
    return {"origin": origin, "dataset": hub_dataset} if origin == "hub" else {"origin": origin}


def load_source(out_dir: str) -> dict | None:
    """The run's data_source.json (None before the run wrote it)."""
    return read_json(os.path.join(out_dir, SOURCE_FILE))


def resume_source(recorded: dict | None, data_files: list[str] | None) -> tuple[list[str] | None, str]:
    """(data files, origin) that continue the recorded source; DataError (one line) if the given or recorded
    files are missing or hold other contents. A run saved before sources were recorded takes what is given."""
    if recorded is None:
        return data_files, "auto"
    origin = recorded["origin"]
    if origin == "prepared":
        if data_files:
            raise DataError(f"this run trained on the prepared dataset {recorded['path']}, not on files; drop "
                            "--data-files (a moved dataset is passed with --dataset)")
        return None, origin
    if origin != "files":
        if data_files:
            raise DataError(f"this run trained on {_describe(recorded)}, not on files; drop --data-files to resume it")
        return None, origin
    want = recorded["files"]
    paths = data_files or [f["path"] for f in want]
    if not data_files:
        missing = [f["path"] for f in want if not os.path.exists(f["path"])]
        if missing:
            raise DataError(f"the run's data file {missing[0]} is gone; pass the same file from where it is now with "
                            f"--data-files (it is checked by SHA-256 {want[0]['sha256'][:12]}...)")
    check_files(paths)
    if len(paths) != len(want):
        raise DataError(f"this run trained on {len(want)} data file(s), {len(paths)} given; pass the same files")
    for f, path in zip(want, paths):
        if os.path.getsize(path) != f["bytes"] or sha256_file(path) != f["sha256"]:
            raise DataError(f"{path} is not the data this run trained on ({os.path.basename(f['path'])}, "
                            f"{f['bytes']:,} bytes, SHA-256 {f['sha256'][:12]}...; given {os.path.getsize(path):,} "
                            "bytes with other contents): resume with the same files, or start a new run")
    return paths, "files"


def _describe(recorded: dict) -> str:
    if recorded["origin"] == "prepared":
        return f"the prepared dataset {recorded['path']}"
    if recorded["origin"] == "hub":
        return f"{recorded['dataset']} from the hub"
    return "the project's generated stories (offline fallback)"

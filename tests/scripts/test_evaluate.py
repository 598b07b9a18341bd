"""evaluate.py: scores a run's own validation split (files, generated stories, a prepared dataset) or given data
files, shows every figure, and exits 2 with one line on bad input. The scoring math: tests/training/test_scoring.py."""
import importlib.util
import json
import os

import pytest
import torch

import evaluate
from data import generate_stories, split_stories
from data.source import source_record
from tests.helpers import make_run
from training.scoring import score_stories
from training.settings import build_settings, place
from transfer import dense_to_moe

pytestmark = pytest.mark.usefixtures("single_thread", "offline")

STORIES = ["Tom saw a big dog.", "Léa vit un chat 😀 près de l'école.\nThe end."]
EXTRA_BYTES = 1 + 3 + 1 + 1  # beyond one byte per character: é (2 bytes), 😀 (4), è (2), é (2)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------ (d) the run's data
def settings_dict(**flat) -> dict:
    return build_settings("micro", place(flat)).to_dict()


def scored(capsys, *argv) -> dict:
    code, out, err = run(capsys, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def test_default_data_is_the_validation_split_of_the_runs_files(tmp_path, capsys, tokenizer, model):
    stories = generate_stories(60, seed=3)
    path = tmp_path / "stories.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    settings = settings_dict(val_fraction=0.2, seed=5, max_stories=10, seq_len=16, max_seq_len=32)
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer, settings, source_record("files", [str(path)]))
    val = split_stories(stories, 0.2, 5)[1]  # max_stories caps training stories, never the held-out ones
    got = scored(capsys, "--checkpoint", run_dir)
    want = score_stories(model, tokenizer, val, context=16, stride=8)
    assert (got["stories"], got["bytes"], got["context"]) == (12, want.bytes, 16)  # the run's training seq_len
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)
    assert "val_fraction 0.2, seed 5" in got["data"] and "stories.txt" in got["data"]

    path.write_text(path.read_text() + "One more story.\n<|endoftext|>\n")  # another file: another split
    code, _, err = run(capsys, "--checkpoint", run_dir)
    assert code == 2 and "changed since the run read it" in err and err.count("\n") == 1
    os.remove(path)
    code, _, err = run(capsys, "--checkpoint", run_dir)
    assert code == 2 and "is gone" in err and err.count("\n") == 1


def test_default_data_is_the_validation_split_of_generated_stories(tmp_path, capsys, tokenizer, model):
    settings = settings_dict(val_fraction=0.1, seed=7, offline_stories=50)
    run_dir = make_run(tmp_path / "run", {"moe": dense_to_moe(model, 4, 2)}, tokenizer, settings,
                       {"origin": "generated"})
    val = split_stories(generate_stories(50, seed=7), 0.1, 7)[1]
    got = scored(capsys, "--checkpoint", run_dir, "--stride", 32)
    want = score_stories(dense_to_moe(model, 4, 2), tokenizer, val, context=32, stride=32)
    assert (got["stories"], got["bytes"], got["context"], got["stride"]) == (5, want.bytes, 32, 32)
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)
    assert "generated" in got["data"]


def test_default_data_is_the_validation_split_of_a_prepared_dataset(tmp_path, capsys, model):
    prepared = pytest.importorskip("data.prepared")
    path = tmp_path / "stories.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in generate_stories(80, seed=6) + STORIES))
    ds = prepared.prepare_dataset(str(tmp_path / "ds"), [str(path)], 300, val_fraction=0.1, seed=2, workers=1,
                                  tokenizer_sample_bytes=20_000, log=lambda _: None)
    run_dir = make_run(tmp_path / "run", {"dense": model}, ds.tokenizer, settings_dict(), ds.source_record())
    val = ds.val_stories()
    got = scored(capsys, "--checkpoint", run_dir)
    want = score_stories(model, ds.tokenizer, val)
    assert (got["stories"], got["bytes"]) == (8, want.bytes) and "prepared dataset" in got["data"]
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)

    record = json.load(open(os.path.join(run_dir, "data_source.json")))
    json.dump(dict(record, fingerprint="0" * 64), open(os.path.join(run_dir, "data_source.json"), "w"))
    code, _, err = run(capsys, "--checkpoint", run_dir)
    assert code == 2 and "holds other data" in err and err.count("\n") == 1


def test_prepared_origin_without_its_module_exits_2(tmp_path, capsys, tokenizer, model):
    if importlib.util.find_spec("data.prepared") is not None:
        pytest.skip("data/prepared.py exists: the prepared origin is read, not refused")
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer, settings_dict(),
                       {"origin": "prepared", "path": str(tmp_path / "prep")})
    code, _, err = run(capsys, "--checkpoint", run_dir)
    assert code == 2 and "data/prepared.py is not in this checkout" in err and err.count("\n") == 1


@pytest.mark.slow
def test_data_files_score_all_their_stories_or_the_first_n(tmp_path, capsys, tokenizer, model):
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer)  # no settings, no source: files needed
    stories = generate_stories(9, seed=4) + STORIES
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    got = scored(capsys, "--checkpoint", run_dir, "--data-files", path)
    want = score_stories(model, tokenizer, stories)  # no recorded seq_len: max_seq_len, stride half of it
    assert (got["stories"], got["tokens"], got["bytes"], got["context"]) == (11, want.tokens, want.bytes, 32)
    assert got["nats"] == pytest.approx(want.nats, rel=1e-6)
    got = scored(capsys, "--checkpoint", run_dir, "--data_files", path, "--max-stories", 3)
    assert got["stories"] == 3 and got["bytes"] == sum(len(s.encode()) for s in stories[:3])


def test_the_text_block_shows_every_figure(tmp_path, capsys, tokenizer, model):
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer)
    path = tmp_path / "s.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES))
    code, out, _ = run(capsys, "--checkpoint", run_dir, "--data-files", path)
    want = score_stories(model, tokenizer, STORIES)
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["bits/byte"] == f"{want.bits_per_byte:.5f}" and lines["perplexity"] == f"{want.perplexity:.4f}"
    assert lines["loss"] == f"{want.loss_per_token:.5f} nats per token" and "s.txt (2 stories)" in lines["data"]


# ------------------------------------------------------------------------------------------ (e) bad input
@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "NOWHERE"], "no such directory"),
    ([], "--checkpoint"),
    (["--checkpoint", "RUN", "--max_stories", "0"], "--max_stories=0 must be >= 1"),
    (["--checkpoint", "RUN", "--batch_size", "0"], "--batch_size=0 must be >= 1"),
    (["--checkpoint", "RUN", "--context", "64"], "--context=64 exceeds the model's max_seq_len=32"),
    (["--checkpoint", "RUN", "--context", "16", "--stride", "17"], "--stride=17 exceeds the context of 16"),
    (["--checkpoint", "RUN", "--data-files", "missing.txt"], "missing.txt: no such file"),
    (["--checkpoint", "RUN", "--device", "gpu"], "--device 'gpu' is not a device"),
    pytest.param(["--checkpoint", "RUN", "--device", "cuda"], "torch.cuda.is_available() is False",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    (["--checkpoint", "RUN", "--max_stories", "many"], "invalid int value"),
    (["--checkpoint", "RUN"], "no data_source.json"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, tokenizer, model, argv, message):
    run_dir = make_run(tmp_path / "run", {"dense": model}, tokenizer)
    code, out, err = run(capsys, *[run_dir if a == "RUN" else a for a in argv])
    assert code == 2 and out == "" and message in err and err.count("\n") == 1 and err.startswith("error: ")

"""Crash and resume without loss: SIGKILL at random moments, SIGTERM/SIGINT, NaN, and bad input at the CLI."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import export_hf
import train_tinystories
from training.checkpoint import latest_checkpoint, list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--preset", "micro", "--dense_steps=40", "--moe_steps=20", "--grown_steps=20", "--checkpoint_interval=4",
         "--eval_interval=10", "--log_interval=2"]
# Long enough (about 10 s of training) for kills to land mid-phase, mid-transition and mid-checkpoint.
LONG = ["--preset", "micro", "--dense_steps=150", "--moe_steps=60", "--grown_steps=60", "--checkpoint_interval=10",
        "--eval_interval=30", "--log_interval=5"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2")


def losses(out_dir) -> list[tuple]:
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
    return [(r["kind"], r["phase"], r["global_step"], r["loss"]) for r in recs]


def start(out_dir, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "train_tinystories.py", "--out-dir", str(out_dir)] + (["--resume"] if resume else LONG)
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = start(out, resume=False)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    return losses(out)


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        resume = (tmp_path / "settings.json").exists()
        proc = start(tmp_path, resume)
        try:
            proc.wait(timeout=rng.uniform(2.5, 7.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)  # no chance to clean up: mid-step, mid-transition or mid-write
            proc.wait()
            kills += 1
        if proc.returncode == 0:
            break
    assert kills >= 2
    proc = start(tmp_path, resume=(tmp_path / "settings.json").exists())
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert losses(tmp_path) == reference  # bit-identical: data order, RNG and optimizer state restored


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_and_exit_with_a_resume_hint(tmp_path, reference, sig, code):
    proc = start(tmp_path, resume=False)
    deadline = time.time() + 60
    while not list_checkpoints(str(tmp_path / "checkpoints")) and time.time() < deadline:
        time.sleep(0.2)  # wait until training is under way
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, out
    assert f"Stopped by {sig.name}" in out and f"--out-dir {tmp_path} --resume" in out
    resumed = start(tmp_path, resume=True)
    assert resumed.wait(timeout=300) == 0
    assert losses(tmp_path) == reference


def test_nan_loss_halts_with_exit_1_and_saves_nothing_after_it(tmp_path, monkeypatch, capsys):
    import training.loop as loop

    real, calls = loop.lm_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, total = real(*args, **kwargs)
        calls["n"] += 1
        return loss, total * float("nan") if calls["n"] >= 23 else total

    monkeypatch.setattr(loop, "lm_loss", poisoned)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert train_tinystories.main(SHORT + ["--out-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "✗ HALTED" in out and "loss became nan at dense step 24" in out and "--dense_lr=" in out
    last = latest_checkpoint(str(tmp_path))
    assert last.meta["step"] == 20 and last.meta["phase"] == "dense"  # the last save before step 23
    assert all(r[2] <= 22 for r in losses(tmp_path))


def bad_file(tmp_path, kind):
    path = tmp_path / ("data.bin" if kind == "extension" else "data.txt")
    content = {"empty": b"", "no_separator": b"One long story without any separator line.\n" * 50,
               "undecodable": b"Once upon a time\n<|endoftext|>\n\xff\xfe bad bytes\n<|endoftext|>\n",
               "tiny": b"Hi.\n<|endoftext|>\nYo.\n<|endoftext|>\n", "extension": b"x"}[kind]
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind, text", [("empty", "empty file"), ("no_separator", "<|endoftext|>"),
                                        ("undecodable", "byte"), ("tiny", "too little text"),
                                        ("extension", "unsupported extension")])
def test_bad_data_files_exit_2_with_one_line(tmp_path, monkeypatch, capsys, kind, text):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = bad_file(tmp_path, kind)
    assert train_tinystories.main(SHORT + ["--out-dir", str(tmp_path / "run"), "--data-files", str(path)]) == 2
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unwritable_output_directory_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert train_tinystories.main(SHORT + ["--out-dir", str(blocker / "run")]) == 2
    assert "cannot write to --out-dir" in capsys.readouterr().err


def test_export_refuses_a_checkpoint_whose_weights_do_not_match_its_architecture(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    assert train_tinystories.main(SHORT + ["--out-dir", str(run), "--dense_steps=4", "--moe_steps=4",
                                           "--grown_steps=4"]) == 0
    ckpt = latest_checkpoint(str(run))
    meta_path = os.path.join(ckpt.path, "meta.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["dim"] = 96  # another architecture than the stored weights
    json.dump(meta, open(meta_path, "w"))
    capsys.readouterr()
    assert export_hf.main(["--checkpoint", ckpt.path, "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "do not match its recorded architecture" in err and "size mismatch" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()

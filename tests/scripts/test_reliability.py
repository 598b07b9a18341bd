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
from tests.helpers import ROOT
from training.run_state.checkpoint import latest_checkpoint, list_checkpoints

SHORT = ["--preset", "micro", "--dense_steps=40", "--moe_steps=20", "--grown_steps=20", "--checkpoint_interval=4",
         "--eval_interval=10", "--log_interval=2"]
# Long enough (about 10 s of training) for kills to land mid-phase, mid-transition and mid-checkpoint.
LONG = ["--preset", "micro", "--dense_steps=150", "--moe_steps=60", "--grown_steps=60", "--checkpoint_interval=10",
        "--eval_interval=30", "--log_interval=5"]
# two threads alone; one under pytest -n, where the workers already fill the cores (tests/conftest.py)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def losses(out_dir) -> list[tuple]:
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
    return [(r["kind"], r["phase"], r["global_step"], r["loss"]) for r in recs if r["kind"] in ("train", "eval")]


def start(out_dir, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "train_tinystories.py", "--out-dir", str(out_dir)] + (["--resume"] if resume else LONG)
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = start(out, resume=False)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    return losses(out)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------- printed commands, verbatim
QUICK = ["--preset", "micro", "--dense_steps=40", "--moe_steps=20", "--grown_steps=20", "--checkpoint_interval=5",
         "--eval_interval=10", "--log_interval=5"]


def printed_command(output: str) -> list[str]:
    """The last `python train_tinystories.py ...` line the program printed, split as a shell would."""
    import shlex

    lines = [ln.strip() for ln in output.splitlines() if ln.strip().startswith("python train_tinystories.py")]
    assert lines, output[-2000:]
    return shlex.split(lines[-1])


def run_printed(cmd: list[str]) -> subprocess.CompletedProcess:
    assert cmd[:2] == ["python", "train_tinystories.py"]
    return subprocess.run([sys.executable] + cmd[1:], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def story_file(tmp_path_factory):
    from data.synthetic import generate_stories

    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(generate_stories(1500, seed=5)) + "\n<|endoftext|>\n")
    return str(path)


@pytest.fixture(scope="module")
def file_reference(tmp_path_factory, story_file):
    out = tmp_path_factory.mktemp("fileref")
    proc = subprocess.run([sys.executable, "train_tinystories.py", *QUICK, "--data-files", story_file, "--out-dir",
                           str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    return losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_resume_command_printed_after_a_signal_works_as_printed_on_a_file_run(tmp_path, story_file,
                                                                                  file_reference, sig):
    args = [sys.executable, "train_tinystories.py", *QUICK, "--data-files", story_file, "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list_checkpoints(str(tmp_path / "checkpoints")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    cmd = printed_command(out)
    assert "--data-files" not in cmd  # the run knows its data
    resumed = run_printed(cmd)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert losses(tmp_path) == file_reference


@pytest.mark.slow
def test_the_command_printed_after_a_failed_check_works_as_printed(tmp_path, story_file, file_reference):
    proc = subprocess.run([sys.executable, "train_tinystories.py", *QUICK, "--data-files", story_file, "--out-dir",
                           str(tmp_path), "--noise_std=0"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "✗ HALTED" in proc.stdout
    resumed = run_printed(printed_command(proc.stdout))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert losses(tmp_path) == file_reference  # resumed with noise_std=0.3, the reference's default


@pytest.mark.slow
def test_the_command_printed_after_nan_works_as_printed(tmp_path, story_file):
    proc = subprocess.run([sys.executable, "train_tinystories.py", *QUICK, "--data-files", story_file, "--out-dir",
                           str(tmp_path), "--dense_lr=1e6", "--warmup_steps=1"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "loss became nan" in proc.stdout
    cmd = printed_command(proc.stdout)
    assert "--dense_lr=3.3e+05" in cmd
    resumed = run_printed(cmd)  # still far too high: it halts again, but it is accepted and runs
    assert resumed.returncode == 1 and "loss became nan" in resumed.stdout, resumed.stderr[-2000:]


@pytest.mark.slow
def test_resume_refuses_other_data_and_finds_moved_files(tmp_path, story_file, capsys):
    import shutil

    monkey_env = dict(HF_HUB_OFFLINE="1")
    os.environ.update(monkey_env)
    own = tmp_path / "own.txt"
    shutil.copy(story_file, own)
    short = [*QUICK, "--dense_steps=10", "--moe_steps=5", "--grown_steps=5"]
    run_dir = str(tmp_path / "run")
    assert train_tinystories.main([*short, "--data-files", str(own), "--out-dir", run_dir, "--noise_std=0"]) == 1
    other = tmp_path / "other.txt"
    other.write_text(own.read_text().replace("Lily", "Lola"))
    capsys.readouterr()
    assert train_tinystories.main(["--out-dir", run_dir, "--resume", "--data-files", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not the data this run trained on (own.txt" in err and err.count("\n") == 1
    moved = tmp_path / "moved.txt"
    own.rename(moved)
    assert train_tinystories.main(["--out-dir", run_dir, "--resume", "--noise_std=0.3"]) == 2
    assert "own.txt is gone; pass the same file from where it is now with --data-files" in capsys.readouterr().err
    assert train_tinystories.main(["--out-dir", run_dir, "--resume", "--noise_std=0.3", "--data-files",
                                   str(moved)]) == 0


@pytest.mark.slow
def test_a_failed_start_leaves_no_tokenizer_for_the_next_one(tmp_path, story_file, capsys):
    os.environ["HF_HUB_OFFLINE"] = "1"
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hi there little one.\n<|endoftext|>\nA cat sat.\n<|endoftext|>\n" * 3)
    run_dir = tmp_path / "run"
    assert train_tinystories.main([*QUICK, "--data-files", str(tiny), "--out-dir", str(run_dir)]) == 2
    assert "too little text" in capsys.readouterr().err
    assert train_tinystories.main([*QUICK, "--dense_steps=5", "--moe_steps=5", "--grown_steps=5", "--data-files",
                                   story_file, "--out-dir", str(run_dir)]) == 0
    from data import load_tokenizer

    assert len(load_tokenizer(str(run_dir / "tokenizer"))) == 512  # micro's vocabulary, not the tiny text's


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_traceback_and_the_last_checkpoint_is_whole(tmp_path, reference):
    proc = start(tmp_path, resume=False)
    deadline = time.time() + 60
    while not list_checkpoints(str(tmp_path / "checkpoints")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    assert "Stopped" in out and "--resume" in out
    assert latest_checkpoint(str(tmp_path)) is not None  # hashes verified: whole
    resumed = start(tmp_path, resume=True)
    assert resumed.wait(timeout=300) == 0
    assert losses(tmp_path) == reference

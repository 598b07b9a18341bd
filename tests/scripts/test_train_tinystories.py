"""The main job end to end on the micro preset: three phases, verified transitions, halting, resume, bad input."""
import json
import os
import subprocess
import sys
import time

import pytest

import train_tinystories
from data.synthetic import generate_stories
from tests.helpers import ROOT, free_port
from training.run_state.checkpoint import latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.usefixtures("offline")


def run(out_dir, *args) -> int:
    return train_tinystories.main(["--preset", "micro", "--out-dir", str(out_dir), *args])


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def losses(out_dir) -> list[tuple]:
    """Every train and eval loss with where it was taken: what a resumed run must reproduce exactly."""
    return [(r["kind"], r["phase"], r["step"], r["global_step"], r["loss"]) for r in records(out_dir)
            if r["kind"] in ("train", "eval")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    os.environ["HF_HUB_OFFLINE"] = "1"
    assert train_tinystories.main(["--preset", "micro", "--out-dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_micro_pipeline_runs_all_phases_with_outputs(finished_run, capsys):
    out = finished_run
    recs = records(out)
    assert [p for p in ("dense", "moe", "grown") if any(r.get("phase") == p for r in recs)] == ["dense", "moe", "grown"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert all(r["loss"] == r["loss"] for r in evals) and evals[-1]["loss"] < evals[0]["loss"]
    assert os.path.getsize(out / "loss_curve.png") > 10_000
    done = {c.phase for c in list_checkpoints(str(out / "checkpoints")) if c.meta["phase_done"]}
    assert done == {"dense", "moe", "grown"}
    assert (out / "tokenizer" / "tokenizer.json").exists() and (out / "settings.json").exists()
    assert run(out, "--resume") == 0
    assert "already finished" in capsys.readouterr().out


@pytest.mark.slow
def test_output_shows_headers_checks_and_summary(tmp_path, capsys):
    assert run(tmp_path) == 0
    out = capsys.readouterr().out
    for text in ("Phase 1: dense", "Phase 2: MoE", "Phase 3: grown MoE", "Total parameters:",
                 "Active parameters per token:", "(top-2 of 4 experts)", "Efficiency:", "step 5 | loss",
                 "TRANSITION 1", "✓ PASSED — functional equivalence confirmed", "VERIFICATION SUMMARY",
                 "✓ ALL CHECKS PASSED", "TRAINING SUMMARY", "Sample: Once upon a time", "NOT TinyStories"):
        assert text in out, text


@pytest.mark.slow
def test_zero_noise_halts_at_transition_2_then_resume_matches_uninterrupted(tmp_path, finished_run, capsys):
    assert run(tmp_path, "--noise_std=0") == 1
    out = capsys.readouterr().out
    assert "✗ FAILED  Symmetry breaking" in out and "✗ HALTED" in out and "raise noise_std" in out
    assert f"--out-dir {tmp_path} --resume --noise_std=0.3" in out
    assert latest_checkpoint(str(tmp_path)).meta["phase"] == "moe"  # the trained phases are kept
    assert (tmp_path / "loss_curve.png").exists()
    assert train_tinystories.main(["--out-dir", str(tmp_path), "--resume", "--noise_std=0.3"]) == 0
    assert losses(tmp_path) == losses(finished_run)  # data order, RNG and optimizer state restored: bit-identical


@pytest.mark.slow
def test_resume_mid_phase_reproduces_the_uninterrupted_losses(tmp_path, finished_run):
    """Keep only an early mid-phase checkpoint, as if the process died there, and resume."""
    assert run(tmp_path) == 0
    root = tmp_path / "checkpoints"
    keep = "dense-000015"
    for c in list_checkpoints(str(root), verify=False):
        if os.path.basename(c.path) != keep:
            import shutil

            shutil.rmtree(c.path)
    (root / "LATEST").write_text(keep)
    assert train_tinystories.main(["--out-dir", str(tmp_path), "--resume"]) == 0
    assert losses(tmp_path) == losses(finished_run)


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    assert run(tmp_path, "--noise_std=0") == 1
    latest = latest_checkpoint(str(tmp_path))
    with open(os.path.join(latest.path, "model.safetensors"), "r+b") as f:
        f.seek(200)
        f.write(b"garbage")
    fallback = latest_checkpoint(str(tmp_path), log=print)
    assert fallback is not None and fallback.path != latest.path
    assert "corrupted" in capsys.readouterr().out


@pytest.mark.slow
def test_local_text_files_in_the_official_layout(tmp_path, capsys):
    data = tmp_path / "stories.txt"
    data.write_text("\n<|endoftext|>\n".join(generate_stories(1500, seed=3)) + "\n<|endoftext|>\n")
    assert run(tmp_path / "run", "--data-files", str(data)) == 0
    assert "local files: stories.txt (1,500 stories)" in capsys.readouterr().out


@pytest.mark.parametrize("args, text", [
    (["--bogus=1"], "unknown setting --bogus"),
    (["--seq_len=999"], "seq_len=999 exceeds max_seq_len=128"),
    (["--scale_factor=0"], "scale_factor=0"),
    (["--scale_factor=1.5"], "expected an integer"),
    (["--top_k=0"], "top_k=0"),
    (["--moe_steps=-5"], "moe_steps=-5"),
    (["--top_k=9"], "top_k=9"),
    (["--noise_std=-1"], "noise_std=-1"),
    (["--dense_steps=0"], "dense_steps=0"),
    (["--dense_lr=0"], "dense_lr=0"),
    (["--n_heads=3"], "n_heads=3 must divide dim=64"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data-files", "/no/such/file.txt"], "no such file"),
    (["--resume"], "holds no run"),
])
def test_bad_input_exits_2_before_any_work(tmp_path, capsys, args, text):
    out = tmp_path / "run"
    assert train_tinystories.main(["--preset", "micro", "--out-dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1  # one line
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_existing_run_is_not_overwritten_and_its_model_is_fixed(finished_run, capsys):
    before = sorted(os.listdir(finished_run / "checkpoints"))
    assert run(finished_run) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_tinystories.main(["--out-dir", str(finished_run), "--resume", "--dim=128"]) == 2
    assert "cannot change on --resume" in capsys.readouterr().err
    assert sorted(os.listdir(finished_run / "checkpoints")) == before


@pytest.mark.slow
def test_a_refused_resume_changes_nothing(tmp_path, capsys):
    assert run(tmp_path, "--noise_std=0") == 1
    settings = (tmp_path / "settings.json").read_text()
    assert train_tinystories.main(["--out-dir", str(tmp_path), "--resume", "--seed=9", "--noise_std=0.3"]) == 2
    assert "--seed=9: the seed (data split, batch order, noise) of an existing run cannot change" in capsys.readouterr().err
    assert (tmp_path / "settings.json").read_text() == settings
    assert train_tinystories.main(["--out-dir", str(tmp_path), "--resume", "--noise_std=0.3"]) == 0


@pytest.mark.slow
def test_ddp_two_cpu_processes_run_every_phase(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "train_tinystories.py", "--preset", "micro", "--out-dir", str(tmp_path), "--dense_steps=10",
           "--moe_steps=6", "--grown_steps=6", "--eval_interval=5", "--checkpoint_interval=5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("VERIFICATION SUMMARY") == 1  # checks run once, on rank 0
    assert proc.stdout.count("TRAINING SUMMARY") == 1 and "✓ ALL CHECKS PASSED" in proc.stdout
    assert {r["phase"] for r in records(tmp_path) if "phase" in r} == {"dense", "moe", "grown"}


@pytest.mark.slow
def test_every_stage_is_evaluated_at_step_0_and_a_grown_model_starts_at_the_old_ones_loss(finished_run):
    recs = records(finished_run)
    first_evals = {r["phase"]: r for r in recs if r["kind"] == "eval" and r["step"] == 0}
    assert set(first_evals) == {"dense", "moe", "grown"}
    transitions = [r for r in recs if r["kind"] == "transition"]
    assert [t["stage"] for t in transitions] == ["moe", "grown"] and all(t["passed"] for t in transitions)
    for t in transitions:
        last_eval = [r for r in recs if r["kind"] == "eval" and r["global_step"] == t["global_step"]
                     and r["phase"] != t["stage"]][-1]
        assert t["loss_before"] == last_eval["loss"] and t["loss_after"] == first_evals[t["stage"]]["loss"]
        assert abs(t["loss_after"] - t["loss_before"]) < 1e-5 * t["loss_before"]  # the functional check's tolerance
        assert all(c["passed"] for c in t["checks"].values())
    assert len(transitions[1]["checks"]) == 5
    assert [r["kind"] for r in recs][0] == "start" and recs[-1]["kind"] == "outcome"
    assert recs[-1]["status"] == "finished" and [r["phase"] for r in recs if r["kind"] == "sample"] == [
        "dense", "moe", "grown"]
    train = [r for r in recs if r["kind"] == "train"]
    assert all(b["tokens"] > a["tokens"] and b["flops"] > a["flops"] for a, b in zip(train, train[1:]))
    assert train[-1]["epochs"] == pytest.approx(train[-1]["tokens"] / recs[0]["train_tokens"])
    assert all(r["tokens_per_s"] > 0 for r in train) and any("balance" in r for r in train)
    layers = {"moe": 2, "grown": 4}  # micro: 2 blocks, growth adds 2
    routed = [r for r in recs if r["kind"] == "eval" and r["phase"] != "dense"]
    assert all(len(r["routing"]["load"]) == layers[r["phase"]] for r in routed)
    assert all(abs(sum(row) - 1) < 1e-4 and len(row) == 4 for r in routed for row in r["routing"]["load"])


def phase_lrs(out_dir) -> dict[str, list[float]]:
    """LR of every logged step after the micro preset's 5 warm-up steps, per phase."""
    return {p: [r["lr"] for r in records(out_dir) if r["kind"] == "train" and r["phase"] == p and r["step"] > 5]
            for p in ("dense", "moe", "grown")}


@pytest.mark.slow
def test_by_default_phases_one_and_two_hold_their_lr_and_phase_three_decays(tmp_path):
    assert run(tmp_path / "wsd") == 0
    lrs = phase_lrs(tmp_path / "wsd")
    assert set(lrs["dense"]) == {2e-3} and set(lrs["moe"]) == {1e-3}  # the micro preset's LRs
    assert lrs["grown"][-1] < 0.2 * 3e-4
    assert run(tmp_path / "cos", "--decay=every_phase") == 0
    lrs = phase_lrs(tmp_path / "cos")
    assert all(lrs[p][-1] < 0.2 * lrs[p][0] for p in lrs)


# ------------------------------------------------------------------------- one process per run, disk, refused starts
@pytest.mark.slow
def test_a_second_process_on_the_same_run_is_refused_naming_the_first(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "train_tinystories.py", "--preset", "micro", "--out-dir", str(tmp_path / "run")]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "run" / "run.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.wait(timeout=300) == 0, first.stdout.read()[-2000:]
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"PID {first.pid}" in second.stderr and "in use by another run" in second.stderr


def test_a_start_refused_by_its_data_leaves_no_run_directory(tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hi.\n<|endoftext|>\nYo.\n<|endoftext|>\n")
    assert run(tmp_path / "run", "--data-files", str(tiny)) == 2
    assert "too little text" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_too_little_disk_space_is_exit_2_before_training(tmp_path, monkeypatch, capsys):
    import common.files as disk

    monkeypatch.setattr(disk, "free_bytes", lambda path: 5 << 20)  # 5 MiB free: micro needs ~100 MiB of checkpoints
    assert run(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "checkpoints" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_write_that_fails_mid_run_is_one_line_and_the_printed_resume_works(tmp_path, finished_run, monkeypatch,
                                                                           capsys):
    import errno

    import training.pipeline as pipeline
    from common.files import WriteFailed

    real, calls = pipeline.save_checkpoint, {"n": 0}

    def fails_on_the_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise WriteFailed(str(tmp_path / "checkpoints" / "moe-000015"), "no space left on device", 1 << 20,
                              9 << 20, errno.ENOSPC)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "save_checkpoint", fails_on_the_fourth)
    assert run(tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not write") and "moe-000015" in err
    command = err.strip().splitlines()[-1].split()
    assert command[:2] == ["python", "train_tinystories.py"] and "--resume" in command
    monkeypatch.setattr(pipeline, "save_checkpoint", real)
    assert train_tinystories.main(command[2:]) == 0
    assert losses(tmp_path) == losses(finished_run)


# ------------------------------------------------------------------------- plan, prepared data, memory pre-flight
def test_plan_of_the_cuda_preset_prints_on_a_cpu_and_writes_nothing(tmp_path, capsys):
    assert train_tinystories.main(["--preset", "cuda", "--plan", "--out-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    for text in ("Phase 1: dense", "Phase 3: grown MoE", "peak", "transition", "MFU", "NVIDIA H100"):
        assert text in out, text
    assert not (tmp_path / "run").exists()


def test_plan_counts_epochs_over_local_files(tmp_path, capsys):
    data = tmp_path / "stories.txt"
    data.write_text("".join(f"{s}\n<|endoftext|>\n" for s in generate_stories(300, seed=0)))
    assert run(tmp_path / "run", "--plan", "--data-files", str(data)) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total")).split()
    from training.plan import estimate_tokens

    # micro: 70 steps of 8 x 64 tokens; 95% of the stories train (val_fraction 0.05)
    assert float(total[4]) == pytest.approx(35_840 / (estimate_tokens(data.stat().st_size, 512) * 0.95), rel=0.02)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def prepared_micro(tmp_path_factory):
    from data.prepared import prepare_dataset

    out = str(tmp_path_factory.mktemp("prepared") / "micro-512")
    prepare_dataset(out, None, 512, origin="generated", offline_stories=2000, val_fraction=0.05, seed=1337,
                    workers=1, log=lambda _: None)
    return out


@pytest.mark.slow
def test_a_prepared_dataset_trains_resumes_and_is_recorded(tmp_path, prepared_micro, capsys):
    out = tmp_path / "run"
    assert run(out, "--dataset", prepared_micro, "--dense_steps=4", "--moe_steps=4", "--grown_steps=4",
               "--checkpoint_interval=2", "--eval_interval=2", "--log_interval=2", "--grad_accum_steps=2") == 0
    assert "Data: prepared dataset" in capsys.readouterr().out
    source = json.load(open(out / "data_source.json"))
    assert source["origin"] == "prepared" and os.path.samefile(source["path"], prepared_micro)
    assert (out / "tokenizer" / "tokenizer.json").exists() and not (out / "cache").exists()  # nothing re-tokenized
    start = records(out)[0]
    from data.prepared import open_prepared

    assert start["train_tokens"] == len(open_prepared(prepared_micro).train_tokens)
    keep = [c for c in list_checkpoints(str(out / "checkpoints")) if c.meta["phase"] == "moe" and c.meta["phase_done"]]
    for c in list_checkpoints(str(out / "checkpoints")):
        if c.meta["global_step"] > keep[0].meta["global_step"]:
            import shutil

            shutil.rmtree(c.path)
    (out / "checkpoints" / "LATEST").write_text(os.path.basename(keep[0].path))
    before = losses(out)
    assert train_tinystories.main(["--out-dir", str(out), "--resume"]) == 0
    assert losses(out) == before


@pytest.mark.slow
def test_a_prepared_dataset_fixes_the_vocabulary_and_is_checked_on_resume(tmp_path, prepared_micro, capsys):
    assert run(tmp_path / "a", "--dataset", prepared_micro, "--vocab_size=1024") == 2
    err = capsys.readouterr().err
    assert "prepared with a 512-token tokenizer" in err and "--vocab_size 1024" in err
    assert run(tmp_path / "b", "--dataset", str(tmp_path / "nowhere")) == 2
    assert "prepare_data.py" in capsys.readouterr().err
    assert run(tmp_path / "c", "--dataset", prepared_micro, "--data-files", "x.txt") == 2
    assert "pass one" in capsys.readouterr().err


def test_a_run_that_would_not_fit_the_gpu_stops_before_any_work_naming_what_fits(tmp_path, monkeypatch):
    import torch

    from config import ConfigError
    from training.plan import check_memory
    from training.settings import RunRequest
    from training.parallel.runtime import Runtime
    from training.settings import build_settings

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-40GB")
    s = build_settings("cuda", {"train": {"batch_size": 64}})
    req = RunRequest(s, str(tmp_path / "run"), preset="cuda")
    rt = Runtime(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 << 30, 80 << 30))
    check_memory(req, rt)  # fits: nothing said
    from training.plan import make_plan

    peak = make_plan(s, device_type="cuda", gpu_name="NVIDIA A100-SXM4-40GB").peak_bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(peak * 0.8), 40 << 30))
    with pytest.raises(ConfigError) as e:
        check_memory(req, rt)
    message = str(e.value)
    assert "GiB at its peak" in message and ("--grad_accum_steps" in message or "--activation_checkpointing" in message)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_micro_with_bf16_autocast_compile_and_accumulation_runs_every_phase_verified(tmp_path, capsys):
    """The CUDA defaults' code paths on CPU: bf16 autocast end to end (the checks stay float64), torch.compile of
    every phase's model, two micro-batches per step. Few steps: compiling dominates (about a minute a phase)."""
    assert run(tmp_path, "--precision=bf16", "--compile=true", "--grad_accum_steps=2", "--dense_steps=4",
               "--moe_steps=2", "--grown_steps=2", "--eval_interval=2", "--checkpoint_interval=4",
               "--log_interval=2") == 0
    out = capsys.readouterr().out
    assert out.count("✓ ALL CHECKS PASSED") == 2 and "TRAINING SUMMARY" in out
    recs = records(tmp_path)
    assert recs[0]["precision"] == "bf16" and recs[-1]["status"] == "finished"
    train = [r for r in recs if r["kind"] == "train"]
    assert all(r["loss"] == r["loss"] and r["loss"] < 7 for r in train)
    assert train[-1]["tokens"] == (4 + 2 + 2) * 2 * 8 * 64  # steps x micro-batches x batch_size x seq_len
    for t in (r for r in recs if r["kind"] == "transition"):  # bf16 evals: equal to bf16 rounding, not 1e-5
        assert abs(t["loss_after"] - t["loss_before"]) < 1e-3 * t["loss_before"]

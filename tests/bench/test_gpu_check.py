"""bench/phase_throughput.py on the CPU (micro preset, two steps), and bench/gpu_check.sh: it parses, its dry run
prints every part, a run records failed and timed-out parts and goes on, a pytest part stopped by its limit keeps
its JUnit XML, at most 4 flat files come back, the summary reads them, and --rehearse runs every part on the CPU."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest
import torch

import bench.phase_throughput as pt
from models import build_model
from tests.helpers import ROOT
from training.stages import PIPELINE, stage_configs
from training.settings import build_settings

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
PARTS = ["env", "cuda_tests", "micro_run", "phases_eager", "phases_compiled", "fsdp", "vs_hf", "memory"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)


@pytest.fixture(scope="module")
def cpu_result(tmp_path_factory, single_thread) -> dict:
    """One smoke run of every phase: micro preset, CPU, one warm-up and two timed steps."""
    out = tmp_path_factory.mktemp("phases") / "phase_throughput.json"
    assert pt.main(["--preset", "micro", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_phase_throughput_measures_every_stage_at_the_presets_shapes(cpu_result):
    r = cpu_result
    assert (r["device"], r["precision"], r["compile"], r["preset"]) == ("cpu", "fp32", False, "micro")
    assert r["peak_flops"] is None  # no datasheet peak for a CPU: no MFU rather than a made-up one
    configs = stage_configs(build_settings("micro"))
    assert [p["phase"] for p in r["phases"]] == [st.name for st in PIPELINE]
    for p, cfg in zip(r["phases"], configs):
        assert (p["dim"], p["n_layers"], p["n_experts"]) == (cfg.dim, cfg.n_layers, cfg.n_experts)
        assert p["tokens_per_step"] == 8 * 64 and p["steps"] == 2 and p["warmup_steps"] == 1
        assert p["ms_per_step"] > 0 and p["tokens_per_s"] == pytest.approx(2 * 512 / p["seconds"])
        assert p["flops_per_s"] == pytest.approx(p["flops_per_token"] * p["tokens_per_s"])
        assert p["loss_finite"] and 5 < p["loss_first"] < 7.5  # random tokens: about ln(512) = 6.24
        assert p["mfu"] is None and p["peak_memory_bytes"] is None and p["memory_ratio"] is None
        assert p["mfu_goal"] == (pt.MOE_GOAL if cfg.is_moe else pt.DENSE_GOAL)


@pytest.mark.slow
def test_phase_throughput_reads_the_plan_for_each_phase(cpu_result):
    pytest.importorskip("training.plan")
    assert cpu_result["plan"] == "ok"
    for p in cpu_result["phases"]:
        assert 0 < p["planned_step_peak_bytes"] <= p["planned_phase_peak_bytes"]
        assert p["planned_phase_peak_at"] in ("training step", "transition checks", "eval")


@pytest.mark.slow
def test_phase_throughput_takes_accumulation_checkpointing_and_bf16_settings(tmp_path, single_thread):
    out = tmp_path / "moe.json"
    argv = ["--preset", "micro", "--device=cpu", "--steps", "1", "--warmup", "0", "--phases", "moe", "--out", str(out),
            "--grad_accum_steps=2", "--activation_checkpointing", "--precision=bf16"]
    assert pt.main(argv) == 0
    r = json.loads(out.read_text())
    assert (r["precision"], r["activation_checkpointing"]) == ("bf16", True)
    [moe] = r["phases"]
    assert moe["phase"] == "moe" and moe["grad_accum_steps"] == 2 and moe["tokens_per_step"] == 2 * 8 * 64


def test_mfu_is_model_flops_over_the_peak_and_the_memory_ratio_is_measured_over_planned():
    model = build_model(stage_configs(build_settings("micro"))[0])
    s = build_settings("micro")
    r = pt.figures(model, "dense", s, steps=10, seconds=2.0, target=pt.Target(1e12, {}, "ok"))
    assert r["flops_per_s"] == pytest.approx(10 * model.flops_per_token(64) * 512 / 2.0)
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e12)
    assert pt.memory(torch.device("cpu"), {"planned_step_peak_bytes": 100})["memory_ratio"] is None
    line = pt.line({**r, "peak_memory_bytes": 3 << 30, "planned_step_peak_bytes": 2 << 30, "memory_ratio": 1.5})
    assert "goal 45% in bf16" in line and "peak 3.00 GiB / plan 2.00 GiB = 1.50" in line


@pytest.mark.parametrize("argv", [["--phases", "nope"], ["--steps", "0"], ["--preset", "huge"]])
def test_phase_throughput_refuses_bad_arguments_with_exit_2(argv, capsys):
    assert pt.main(argv + ["--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_phase_throughput_on_a_machine_without_cuda_refuses_device_cuda(capsys):
    assert pt.main(["--device=cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.slow
def test_phase_throughput_answers_help():
    proc = subprocess.run([sys.executable, "bench/phase_throughput.py", "--help"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--steps" in proc.stdout


# ------------------------------------------------------------------------------------------ gpu_check.sh
MAX_FILES, MAX_BYTES = 8, 16 << 20  # what the device tool brings back from $OUT: 8 files, two folders deep, 16 MiB


def _check(*args, env=None, timeout=120):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)


def _brought_back(out) -> list:
    """Every file under out, asserting what the device tool can bring back: 1..8 files, none too deep or big."""
    files = [f for f in out.rglob("*") if f.is_file()]
    assert 1 <= len(files) <= MAX_FILES, files
    for f in files:
        assert len(f.relative_to(out).parts) <= 3 and f.stat().st_size <= MAX_BYTES, f
    return files


def _unpacked(out, tmp_path):
    dest = tmp_path / "unpacked"
    dest.mkdir()
    with tarfile.open(out / "results.tar.gz") as t:
        t.extractall(dest, filter="data")
    return dest


def test_gpu_check_is_executable_bash_that_parses():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0
    help_text = _check("--help").stdout
    for v in ("ENV", "TESTS", "MICRO", "EAGER", "COMPILED", "FSDP", "HF", "MEMORY", "SCALE"):
        assert f"LIMIT_{v}" in help_text, v
    assert "--rehearse" in help_text


def test_gpu_check_dry_run_prints_every_part_within_600_s_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    proc = _check("--dry-run", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert [line.split()[1] for line in text.splitlines() if line.startswith("== ")] == PARTS
    limits = [int(line.split("limit ")[1].rstrip("s)")) for line in text.splitlines() if line.startswith("== ")]
    assert sum(limits) + 3 * len(limits) <= 480  # well inside the device tool's 600 s per command
    for expected in ("-m pytest -m cuda tests/training/parallel/test_cuda.py", f"--junitxml={out}/cuda_tests.xml",
                     "train_tinystories.py --preset micro --device=cuda --compile=true --precision=bf16",
                     "bench/phase_throughput.py --preset cuda --device=cuda --compile=false --precision=bf16 "
                     "--steps 200 --warmup 5 --out $WORK/phases_eager.json",
                     "--compile=true --precision=bf16 --steps 100 --warmup 5 --out $WORK/phases_compiled.json",
                     "-m torch.distributed.run --standalone --nproc_per_node=1 train_tinystories.py --preset micro "
                     "--device=cuda --parallel=fsdp --precision=bf16",
                     "bench/throughput.py --out-dir $WORK --precision=bf16", "bench/memory_model.py --device=cuda"):
        assert expected in text, expected
    assert "pip" not in text.split() and not out.exists()


def test_gpu_check_prefers_python3_and_takes_limits_and_folder_from_the_environment(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "PYTHON"}
    text = _check("--dry-run", env=env).stdout
    assert f"{shutil.which('python3')} -m pytest" in text
    env = dict(ENV, OUT=str(tmp_path / "from_out"), LIMIT_EAGER="7", PHASE_STEPS="3", LIMIT_SCALE="2")
    text = _check("--dry-run", env=env).stdout
    assert "== phases_eager (limit 14s)" in text and "--steps 3 " in text and f"{tmp_path}/from_out/cuda_tests" in text
    rehearsal = _check("--rehearse", "--dry-run").stdout
    assert "--device=cpu" in rehearsal and "--device=cuda" not in rehearsal and "--preset micro" in rehearsal
    assert _check("--bogus").returncode == 2


@pytest.mark.slow
def test_gpu_check_records_each_part_goes_on_past_failures_and_brings_back_four_files(tmp_path):
    """Tiny limits: every part after env times out (or fails without CUDA); all eight are still recorded, in
    order, in the tarball, an earlier check's files are gone, the summary is printed and written, and the exit
    code says a part did not succeed."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.json").write_text('{"parts": []}')  # an earlier check's: must not pass for this one's
    (out / "notes.txt").write_text("not the check's")
    env = dict(ENV, LIMIT_ENV="90", **{f"LIMIT_{v}": "1" for v in ("TESTS", "MICRO", "EAGER", "COMPILED", "FSDP",
                                                                      "HF", "MEMORY")})
    proc = _check(str(out), env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (out / "notes.txt").unlink()
    assert {f.name for f in _brought_back(out)} <= {"summary.json", "summary.txt", "cuda_tests.xml", "results.tar.gz"}
    work = _unpacked(out, tmp_path)
    parts = [json.loads(line) for line in (work / "parts.jsonl").read_text().splitlines()]
    assert [p["part"] for p in parts] == PARTS
    assert parts[0]["status"] == ("ok" if torch.cuda.is_available() else "failed")
    for p in parts[1:]:
        assert p["status"] in ("timed_out", "failed") and p["wall_s"] < 10, p
        assert (work / p["log"]).exists() and p["commands"]
    # 124: stopped by its limit's signal; 137: killed GRACE seconds later, when a loaded machine is slower to stop it
    assert parts[1]["status"] == "timed_out" and parts[1]["exit_code"] in (124, 137)
    env_facts = json.loads((work / "env.json").read_text())
    assert env_facts["torch"] == torch.__version__ and env_facts["cuda_available"] == torch.cuda.is_available()
    assert "GPU CHECK SUMMARY" in proc.stdout and json.loads((out / "summary.json").read_text())["parts"] == parts


@pytest.mark.slow  # runs bench/gpu_check.sh, whose pytest part waits out its 20 s limit
def test_a_pytest_part_stopped_by_its_limit_still_writes_its_junit_xml(tmp_path):
    """SIGINT, not SIGTERM: pytest finishes its session and writes the XML of the tests that ran."""
    tests = tmp_path / "test_slow_part.py"
    tests.write_text("import time, pytest\npytestmark = pytest.mark.cuda\n\ndef test_quick():\n    pass\n\n"
                     "def test_hangs():\n    time.sleep(600)\n")
    out = tmp_path / "results"
    env = dict(ENV, CUDA_TESTS=str(tests), LIMIT_ENV="60", LIMIT_TESTS="20",
               **{f"LIMIT_{v}": "1" for v in ("MICRO", "EAGER", "COMPILED", "FSDP", "HF", "MEMORY")})
    _check(str(out), env=env, timeout=300)
    root = ET.parse(out / "cuda_tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert [c.get("name") for c in suite.iter("testcase")][:1] == ["test_quick"]
    assert json.loads((out / "summary.json").read_text())["cuda_tests"]["passed"] >= 1


def _finished_check(out, tmp_path, phases: dict) -> None:
    """A results folder as a GPU run leaves it (figures made up, shapes real): the tarball and the XML."""
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    parts = [{"part": p, "limit_s": 10, "exit_code": 0, "status": "ok", "wall_s": 1.5, "log": f"logs/{p}.log",
              "commands": "x"} for p in PARTS]
    (work / "parts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in parts))
    (work / "env.json").write_text(json.dumps({"torch": "2.x", "cuda": "12.8", "gpu_name": "NVIDIA H100 80GB HBM3",
                                               "gpu_memory_gib": 79.2, "git_commit": "0123456789abcdef"}))
    compiled = json.loads(json.dumps(phases))
    compiled["phases"][0]["tokens_per_s"] *= 1.5
    (work / "phases_eager.json").write_text(json.dumps(phases))
    (work / "phases_compiled.json").write_text(json.dumps(compiled))
    records = [{"kind": "train", "phase": "dense", "tokens_per_s": 12345.0, "mfu": 0.1},
               {"kind": "eval", "phase": "dense", "loss": 3.25}, {"kind": "outcome", "status": "finished"}]
    for name in ("micro_run.jsonl", "fsdp_run.jsonl"):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (work / "memory_model_cuda.json").write_text(json.dumps({
        "measured_with": "torch.cuda.max_memory_allocated", "summary": {"step_max_abs_error": 0.04}, "rows": [{}, {}]}))
    (work / "throughput.json").write_text(json.dumps({
        "device": "cuda (bf16)", "precision": "bf16", "peak_gflops": 700000.0, "speedup": {"dense": 1.2, "MoE-8": 1.6},
        "hf_experts": {"dense": None, "MoE-8": "grouped_mm"},
        "steps": [{"model": "MoE-8", "contender": "project", "ms": 50.0, "mfu": 0.3},
                  {"model": "MoE-8", "contender": "HF Mixtral", "ms": 80.0, "mfu": 0.19}]}))
    out.mkdir(exist_ok=True)
    (out / "cuda_tests.xml").write_text('<testsuites><testsuite tests="12" failures="1" errors="0" skipped="1">'
                                        "</testsuite></testsuites>")
    with tarfile.open(out / "results.tar.gz", "w:gz") as t:
        t.add(work, arcname=".")


@pytest.mark.slow
def test_gpu_check_summary_shows_figures_beside_the_goals(tmp_path, cpu_result):
    phases = json.loads(json.dumps(cpu_result))
    phases.update(peak_flops=989.4e12)
    dense = phases["phases"][0]
    dense.update(mfu=0.412, peak_memory_bytes=3 << 30, planned_step_peak_bytes=2 << 30, memory_ratio=1.5)
    phases["phases"][2] = {"phase": "grown", "error": "OutOfMemoryError: CUDA out of memory"}
    out = tmp_path / "out"
    _finished_check(out, tmp_path, phases)
    proc = _check("--summary", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for expected in ("NVIDIA H100 80GB HBM3, 79.2 GiB", "CUDA tests: 10 passed, 1 failed, 1 skipped",
                     "outcome finished", "last eval loss 3.2500, 12,345 tok/s, MFU 10.0%",
                     "MFU 41.2% (goal 45.0%", "peak 3.00 GiB, plan 2.00 GiB, measured/plan 1.50",
                     "grown  error: OutOfMemoryError", "against 989 TFLOP/s", "compiled / eager tokens/s: dense 1.50x",
                     "MoE-8   project is 1.60x the speed of transformers' Mixtral (grouped_mm)", "dense step >= 45% MFU",
                     "plan vs measured over 2 cases: step_max_abs_error 4.0%", "FSDP, 1 process: outcome finished"):
        assert expected in text, expected
    phase_lines = [line for line in text.splitlines() if "MFU" in line]
    assert not any(word in line.lower() for line in phase_lines for word in ("pass", "fail", "✓", "✗"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cuda_tests"]["passed"] == 10 and summary["vs_transformers"]["speedup"]["MoE-8"] == 1.6
    assert summary["memory_model"]["cases"] == 2 and "no result" not in text


def test_gpu_check_summary_of_an_empty_folder_says_what_is_missing_without_crashing(tmp_path):
    proc = _check("--summary", str(tmp_path))
    assert proc.returncode == 0 and "GPU CHECK SUMMARY" in proc.stdout, proc.stderr
    assert "no result (see the parts' logs in results.tar.gz): cuda_tests.xml, parts.jsonl, env.json" in proc.stdout


@pytest.mark.slow
def test_gpu_check_rehearsal_runs_every_part_on_the_cpu_and_brings_back_what_the_device_tool_can(tmp_path):
    """--rehearse: every part on the CPU at tiny sizes, the device's layout: exit 0, 1..8 files, none in a folder
    deeper than two or over 16 MiB, summary.json with every part ok and the figures of each."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, "--rehearse"], cwd=ROOT, env=dict(ENV, OUT=str(out)), capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {f.name for f in _brought_back(out)}
    assert {"summary.json", "cuda_tests.xml", "results.tar.gz"} <= names
    summary = json.loads((out / "summary.json").read_text())
    assert [p["part"] for p in summary["parts"]] == PARTS and {p["status"] for p in summary["parts"]} == {"ok"}
    assert summary["micro_run"]["outcome"] == summary["fsdp_run"]["outcome"] == "finished"
    assert [p["phase"] for p in summary["phases"]["eager"]["phases"]] == ["dense", "moe", "grown"]
    assert summary["phases"]["compiled"]["compile"] is True and summary["vs_transformers"]["speedup"]
    assert summary["memory_model"]["cases"] > 0 and summary["cuda_tests"]["tests"] > 0

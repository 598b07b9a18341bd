"""A run directory is data, never code: every reader refuses a planted pickle payload before any of it runs, and
checkpoints written before the safe loader (tests/fixtures/run_46be59e, by main at 46be59e) still resume exactly."""
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from common.safe_load import UnsafeFile, code_in_pickle, code_in_torch_file, load_torch_data, load_weights
from tests.helpers import ROOT, command_line
from training.run_state.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "run_46be59e")  # micro, 8/4/4 steps, stopped after dense step 4
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


class Payload:
    """Runs a shell command when unpickled: what a planted state.pt would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Evaluator:
    """Reaches eval instead of os.system: any callable outside the allowlist is refused, not a list of bad ones."""

    def __reduce__(self):
        return (eval, ("1 + 1",))


def torch_pickle(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol)
    with zipfile.ZipFile(buf) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def plant(checkpoint: str, marker: str, protocol: int = 2) -> None:
    """Add a payload to the checkpoint's state.pt and rewrite meta.json's hash to match, as an attacker would."""
    path = os.path.join(checkpoint, "state.pt")
    state = torch.load(path, weights_only=False)  # our own fixture: trusted
    state["extra"] = Payload(f"touch {marker}")
    torch.save(state, path, pickle_protocol=protocol)
    meta_path = os.path.join(checkpoint, "meta.json")
    meta = json.load(open(meta_path))
    meta["files"]["state.pt"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    json.dump(meta, open(meta_path, "w"))


def tree_digest(path) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(path) for f in files}


def same(a, b) -> bool:
    """Deep, bit-exact equality of loaded state (types included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_state_of_every_dtype_passes_the_scan(protocol):
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 3)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0], "foreach": None,
                                             "name": "x", "amsgrad": False}]},
             "rng": torch.get_rng_state(),
             "every_dtype": [torch.zeros(2, dtype=d) for d in (torch.float32, torch.float64, torch.float16,
                                                               torch.bfloat16, torch.int64, torch.int32, torch.int16,
                                                               torch.int8, torch.uint8, torch.bool)]}
    found = code_in_pickle(torch_pickle(state, protocol))
    if protocol <= 3:
        assert found is None
    else:  # allowed names, but looked up in a way this project's writer never uses: refused, and said so
        assert found is not None and "STACK_GLOBAL" in found


@pytest.mark.parametrize("payload, named", [
    (Payload("true"), "posix.system"),
    (Evaluator(), "builtin"),  # __builtin__ (protocol 2) or builtins
    (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
])
@pytest.mark.parametrize("protocol", [2, 4])
def test_anything_but_tensors_and_plain_data_is_named_without_running_it(payload, named, protocol):
    found = code_in_pickle(torch_pickle({"ok": torch.ones(1), "bad": payload}, protocol))
    assert found is not None and named in found, found
    assert named in code_in_pickle(pickle.dumps(payload, protocol=protocol))  # a plain pickle, not torch.save's


def test_object_building_opcodes_are_refused_even_with_allowed_names():
    # INST builds an object from a module and name inline: no GLOBAL opcode for the scan to read
    data = b"(icollections\nOrderedDict\np0\n."
    assert "INST" in code_in_pickle(data)
    assert "not a whole pickle" in code_in_pickle(b"\x80\x02}q\x00")  # truncated: no STOP


def test_files_not_in_torch_zip_format_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"rng": torch.get_rng_state()}, legacy, _use_new_zipfile_serialization=False)
    assert "zip format" in code_in_torch_file(str(legacy))
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Payload("true")))
    with pytest.raises(UnsafeFile, match="zip format"):
        load_torch_data(str(raw))


def test_a_planted_payload_is_refused_before_it_runs_by_every_reader_of_a_checkpoint(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(FIXTURE, run)
    checkpoint = run / "checkpoints" / "dense-000004"
    plant(str(checkpoint), str(marker))
    with pytest.raises(CheckpointError, match=r"state\.pt holds a reference to posix\.system"):
        read_checkpoint(str(checkpoint))
    with pytest.raises(CheckpointError, match="do not resume"):
        latest_checkpoint(str(run))
    with pytest.raises(UnsafeFile):
        load_torch_data(str(checkpoint / "state.pt"))
    assert not marker.exists()


def test_checkpoints_written_by_the_previous_loader_load_bit_exactly():
    """The fixture's state.pt was written by main at 46be59e (torch.load(weights_only=False) then): the data-only
    reader returns exactly what that unrestricted reader returns."""
    ckpt = read_checkpoint(os.path.join(FIXTURE, "checkpoints", "dense-000004"))
    unrestricted = torch.load(os.path.join(ckpt.path, "state.pt"), map_location="cpu", weights_only=False)
    assert same(ckpt.load_state(), unrestricted)
    assert same(ckpt.load_state(mmap=True), unrestricted)


def test_a_tokenizer_that_names_its_own_code_does_not_run_it(tmp_path):
    from data.tokenizer import load_tokenizer

    tok, marker = tmp_path / "tok", tmp_path / "PWNED"
    shutil.copytree(os.path.join(FIXTURE, "tokenizer"), tok)
    cfg = json.load(open(tok / "tokenizer_config.json"))
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    json.dump(cfg, open(tok / "tokenizer_config.json", "w"))
    (tok / "evil.py").write_text(f"import os\nos.system('touch {marker}')\n"
                                 "from transformers import PreTrainedTokenizerFast\n"
                                 "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    assert load_tokenizer(str(tok)).eos_token_id is not None
    assert not marker.exists()


def hf_llama(path, bin_payload: str | None = None):
    """A small transformers Llama saved as pytorch_model.bin (optionally with a payload inside) and a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=64))
    llama.config.save_pretrained(str(path))
    weights = dict(llama.state_dict())
    if bin_payload:
        weights["extra"] = Payload(f"touch {bin_payload}")
    torch.save(weights, os.path.join(path, "pytorch_model.bin"))
    shutil.copytree(os.path.join(FIXTURE, "tokenizer"), path, dirs_exist_ok=True)
    return llama


def test_hf_pickle_weights_load_only_as_data(tmp_path):
    from transfer.hf_format import from_hf, read_hf_weights

    good, bad, marker = tmp_path / "good", tmp_path / "bad", tmp_path / "PWNED"
    llama = hf_llama(good)
    model = from_hf(str(good))  # a .bin of plain tensors loads, exactly
    assert torch.equal(model.blocks[0].attention.q_proj.weight, llama.model.layers[0].self_attn.q_proj.weight)
    hf_llama(bad, bin_payload=str(marker))
    with pytest.raises(UnsafeFile, match="posix.system"):
        read_hf_weights(str(bad))
    with pytest.raises(UnsafeFile, match="not a dict of tensors"):
        torch.save([torch.ones(1)], tmp_path / "list.bin")
        load_weights(str(tmp_path / "list.bin"))
    assert not marker.exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", [2, 4])
def test_every_command_refuses_a_planted_run_in_one_line_and_leaves_it_as_it_was(tmp_path, protocol):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(FIXTURE, run)
    plant(str(run / "checkpoints" / "dense-000004"), str(marker), protocol)
    before = tree_digest(run)
    for args in (["train_tinystories.py", "--out-dir", str(run), "--resume"],
                 ["sample.py", "--checkpoint", str(run)],
                 ["evaluate.py", "--checkpoint", str(run), "--max_stories", "2"],
                 ["export_hf.py", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stdout[-2000:], proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "holds a reference to" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
        assert not marker.exists()
    assert tree_digest(run) == before and not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_init_from_hf_refuses_a_planted_pickle_before_any_work(tmp_path):
    src, marker, out = tmp_path / "llama", tmp_path / "PWNED", tmp_path / "run"
    hf_llama(src, bin_payload=str(marker))
    proc = run_cli("train_tinystories.py", "--preset", "micro", "--init-from-hf", str(src), "--out-dir", str(out))
    assert proc.returncode == 2 and "pytorch_model.bin holds a reference to posix.system" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists()


def losses(out_dir) -> list[tuple]:
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
    return [(r["kind"], r["phase"], r["global_step"], r["loss"]) for r in records if r["kind"] in ("train", "eval")]


@pytest.mark.slow
def test_a_run_written_by_the_previous_main_resumes_to_the_same_losses(tmp_path):
    """The fixture holds its uninterrupted run's metrics (all 16 steps); resumed from dense step 4, the same
    losses follow. fp32 on CPU is bit-exact on the machine that wrote the fixture; another CPU's kernels (AVX2 vs
    AVX-512 reductions) move the 7th digit (4.3e-8 relative measured on this project's machines), so the limit is
    1e-5 relative, far below what a resume that draws other batches or restarts AdamW changes."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    proc = run_cli("train_tinystories.py", "--out-dir", str(run), "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Resuming from" in proc.stdout and "ALL CHECKS PASSED" in proc.stdout
    resumed, uninterrupted = losses(run), losses(FIXTURE)
    assert [r[:3] for r in resumed] == [r[:3] for r in uninterrupted]
    assert all(abs(a[3] - b[3]) <= 1e-5 * abs(b[3]) for a, b in zip(resumed, uninterrupted)), (resumed, uninterrupted)


@pytest.mark.slow
def test_the_session_check_names_and_ends_a_process_a_test_left_running(tmp_path):
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n"
                                          "from tests.conftest import no_process_left_running\n")
    (tmp_path / "test_leak.py").write_text("import subprocess\n\ndef test_leaves_an_orphan():\n"
                                           "    subprocess.run(['sh', '-c', 'sleep 97 & exit 0'])\n")
    env = dict(ENV, TESTS_LEFTOVER_GRACE_S="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "still running at the end" in proc.stdout and "sleep 97" in proc.stdout, proc.stdout
    still = [p for p in os.listdir("/proc") if p.isdigit() and command_line(int(p)) == "sleep 97"]
    assert not still


"""parallel=fsdp (training/parallel/sharding.py) on 2 CPU processes (gloo): the same training as one process, the whole
pipeline verified, resume across world sizes, SIGKILL then exact resume, and 1/world of the memory per process.

Each comparison is also shown to bite: a gradient reduction removed, an optimizer state not restored, a grown
model not handed to the other ranks. The 2-process parts run this file as a torchrun worker (bottom).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, children, free_port

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT)
STEPS = 20  # the equality test's optimizer steps
# fp32 reduction-order noise: FSDP sums the gradient norm's squares shard by shard (and all-reduces), one process
# parameter by parameter, so the clip coefficient differs in its last bits; Adam carries that through 20 steps.
# Measured: at most 1.2e-7 relative on the loss (DDP: bit for bit). Broken versions, within 5 steps: clipping by a
# rank's local norm 5e-4, no gradient reduction 1e-2.
EQUAL_REL = 1e-5
# bf16: FSDP2's MixedPrecisionPolicy against DDP under the same bf16 autocast. They differ by design, not only by
# summation order: the policy casts every parameter to bf16 for compute (the embedding, so the residual stream, and
# the norms' weights too), where autocast casts only each matmul's inputs and keeps the residual stream and the norms
# in fp32; both reduce gradients in fp32, but under the policy each rank's weight gradients are computed in bf16
# (rounded to 2^-9 relative) before their fp32 reduce-scatter. Measured (2 CPU processes, dense / MoE): the first
# step's losses agree to 1e-6 / 3e-6 and its gradients to 4.0e-3 / 3.8e-3 relative (L2 over all parameters, about
# two bf16 roundings); the losses part by at most 9.6e-5 / 1.3e-4 in 5 steps and 4.1e-4 / 1.4e-3 in 20 (Adam
# compounds the rounding; an MoE also flips near-tied routes). Tolerances: ~4x the worst. The broken version (no
# gradient reduction) measured 7.1e-3 / 5.9e-3 in 5 steps and 5.1e-1 / 5.5e-1 on the gradients.
BF16_LOSS_REL = 5e-3  # 20 steps
BF16_EARLY_REL = 5e-4  # the first 5 steps, where the broken version is compared
BF16_GRAD_REL = 2e-2  # the first step's gradients (~10 bf16 roundings)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


# ------------------------------------------------------------------------------------------ the equality
def _tokens():
    from data.synthetic import byte_token_batch, generate_stories

    return byte_token_batch(" ".join(generate_stories(300, seed=0)), 1, 60_000).flatten().numpy().astype("uint16")


class _Log:
    def __init__(self):
        self.records = []

    def write(self, **r):
        self.records.append(r)


def tiny_config(n_experts: int):
    from config import ModelConfig

    return ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, max_seq_len=64, n_experts=n_experts, top_k=2)


def train_steps(rt, n_experts: int, steps: int = STEPS) -> dict:
    """steps of a tiny model on rt's processes, the step's batch two streams of 4 sequences (StepBatches) whatever
    the world size: one process runs both as micro-batches. Losses (the global batch's) and rank 0's bytes held."""
    from config import TrainConfig
    from data.tokens import eval_batches
    from models import build_model
    from training.loop import Phase, PhaseRun, lm_loss, train_phase
    from data.tokens import StepBatches
    from training.parallel.sharding import resident_bytes

    torch.manual_seed(0)
    model = build_model(tiny_config(n_experts))
    tc = TrainConfig(batch_size=4, seq_len=32, warmup_steps=2, log_interval=1, eval_interval=steps, eval_batches=1,
                     checkpoint_interval=steps, grad_clip=0.5)  # the clip acts at every step: its norm must be global
    tokens = _tokens()
    batches = StepBatches(tokens, 4, 32, seed=1, rank=rt.rank, world_size=rt.world_size, streams=2)
    optimizer = []
    run = PhaseRun(rt, tc, batches, eval_batches(tokens, 4, 32, 1), _Log(),
                   save=lambda m, opt, st: optimizer.append(opt))
    train_phase(model, Phase("moe" if n_experts else "dense", "", steps, 3e-3, decays=False), run)  # any prefix alike
    x, y = batches.next()
    lm_loss(model, x, y, tc)[1].backward()  # gradients as a step holds them (the loop has freed its own)
    return {"losses": [r["loss"] for r in run.log.records if r["kind"] == "train"],
            "held": resident_bytes(model, optimizer[0])}


def _break_gradient_reduction() -> None:
    """The deliberately broken version: FSDP's reduce-scatter keeps each rank's own gradient shard (no sum)."""
    import torch.distributed as dist

    def local(output, input, *args, **kwargs):
        output.copy_(input.view(dist.get_world_size(), -1)[dist.get_rank()].view_as(output))

    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):  # torch 2.13, 2.6
        if hasattr(dist, name):
            setattr(dist, name, local)


def _clip_by_local_norm(parameters, max_norm: float, *args, **kwargs) -> torch.Tensor:
    """The other deliberately broken version: each rank clips by the norm of its own gradient shards."""
    grads = [p.grad.to_local() for p in parameters if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    for g in grads:
        g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def equality_worker(out: str) -> None:
    """FSDP and DDP, dense and MoE; then FSDP again (5 steps) clipping by each rank's local norm, and with its
    gradient reduction removed."""
    from training.parallel.runtime import setup_runtime, teardown_runtime

    rt, results, clip = setup_runtime("cpu", "fp32"), {}, torch.nn.utils.clip_grad_norm_
    for parallel in ("fsdp", "ddp", "local clip", "no reduction"):
        torch.nn.utils.clip_grad_norm_ = _clip_by_local_norm if parallel == "local clip" else clip
        if parallel == "no reduction":
            _break_gradient_reduction()
        whole = parallel in ("fsdp", "ddp")
        rt.use_parallel(parallel if whole else "fsdp")
        for n_experts in (0, 4):
            results[f"{parallel} {n_experts}"] = train_steps(rt, n_experts, STEPS if whole else 5)
    if rt.is_master:
        json.dump(results, open(out, "w"))
    teardown_runtime(rt)


@pytest.fixture(scope="module")
def one_process():
    """The reference: one process, the same global batch (both streams as two accumulated micro-batches)."""
    from training.parallel.runtime import Runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {n: train_steps(Runtime(torch.device("cpu")), n) for n in (0, 4)}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def mesh_of_one():
    """A sharded runtime in this process: parallel=fsdp on one process shards over a mesh of one."""
    from training.parallel.runtime import Runtime, teardown_runtime

    rt = Runtime(torch.device("cpu"))
    rt.use_parallel("fsdp")
    yield rt
    teardown_runtime(rt)


@pytest.mark.slow
def test_fsdp_on_one_process_trains_exactly_as_plain_training(one_process, mesh_of_one):
    """A mesh of one: the same code path as many processes, and bit for bit the unsharded numbers."""
    got = train_steps(mesh_of_one, 4, 5)
    assert got["losses"] == one_process[4]["losses"][:5]


def test_fsdp_on_a_torch_without_fully_shard_is_refused_in_one_line(monkeypatch):
    import torch.distributed.fsdp as fsdp

    from config import ConfigError
    from training.parallel.runtime import Runtime

    monkeypatch.delattr(fsdp, "fully_shard")  # torch < 2.6
    with pytest.raises(ConfigError) as e:
        Runtime(torch.device("cpu")).use_parallel("fsdp")
    assert "needs torch >= 2.6" in str(e.value) and "--parallel=ddp" in str(e.value) and "\n" not in str(e.value)


def test_a_steps_batch_is_the_same_sequences_on_any_world_size():
    """StepBatches: two streams of 4 (a run started on 2 processes) are the same 8 sequences per step on 1, 2, 4 or 8
    processes, and on 2 they are exactly what each process drew before; 3 processes are refused in one line."""
    from data.text import DataError
    from data.tokens import TokenBatches
    from data.tokens import StepBatches

    tokens = _tokens()

    def steps(world: int, streams: int = 2, accum: int = 1, n: int = 3, start: dict | None = None) -> list:
        procs = [StepBatches(tokens, 4, 16, 7, r, world, accum, streams) for r in range(world)]
        for p in procs if start else ():
            p.load_state_dict(start)
        return [torch.cat([torch.cat([p.next()[0] for _ in range(p.micro_batches)]) for p in procs]) for _ in range(n)]

    before = [TokenBatches(tokens, 4, 16, 7, r, 2) for r in range(2)]
    reference = [torch.cat([b.next()[0] for b in before]) for _ in range(3)]
    for world in (1, 2, 4, 8):
        assert all(torch.equal(a, b) for a, b in zip(steps(world), reference)), world
    one = StepBatches(tokens, 4, 16, 7, 0, 2)  # a 2-process run's rank 0 after a step, resumed on 1 process
    one.next()
    resumed = StepBatches(tokens, 4, 16, 7, 0, 1)
    resumed.load_state_dict(one.state_dict())
    assert resumed.micro_batches == 2 and resumed.state_dict() == dict(one.state_dict(), rank=0)
    assert torch.equal(torch.cat([resumed.next()[0] for _ in range(2)]), reference[1])
    accumulated = steps(1, streams=1, accum=2)  # one process's 2 micro-batches: one each on 2 processes
    assert all(torch.equal(a, b) for a, b in zip(steps(2, streams=1, accum=2), accumulated))
    with pytest.raises(DataError) as e:
        StepBatches(tokens, 4, 16, 7, 0, 3, streams=2)
    message = str(e.value)
    assert "\n" not in message and "8 sequences" in message and "resume on 1, 2, 4, 8 processes" in message


def test_a_sharded_transition_starts_the_grown_model_at_the_old_loss_and_a_lost_handoff_is_caught(mesh_of_one,
                                                                                                 monkeypatch):
    """Growth of a sharded model: gathered to rank 0, upcycled and checked there, sharded again. Its first eval equals
    the small model's to the checks' tolerance; a handoff that shards a fresh model instead does not."""
    from types import SimpleNamespace

    import training.transition as transition_module
    from training.stages import PIPELINE
    from data.tokens import eval_batches
    from models import build_model
    from training.loop import evaluate
    from training.settings import build_settings
    from training.parallel.sharding import is_sharded, sharded_from

    s, rt = build_settings("micro"), mesh_of_one
    torch.manual_seed(0)
    small = sharded_from(build_model(s.model), rt)
    val = eval_batches(_tokens(), 4, 64, 2)
    data = SimpleNamespace(calibration=val[0][0])
    before = evaluate(small, val, rt)

    def first_eval() -> float:
        result = transition_module.transition(PIPELINE[1], small, data, s, rt)
        assert result.passed and is_sharded(result.model) and result.model.config.is_moe
        return evaluate(result.model, val, rt)

    assert abs(first_eval() - before) < 1e-5 * before
    monkeypatch.setattr(transition_module, "sharded_from", lambda full, rt: sharded_from(build_model(full.config), rt))
    assert abs(first_eval() - before) > 100 * 1e-5 * before  # an untrained small model: ln(V) either way, nearly


def relative_differences(a: list[float], b: list[float]) -> list[float]:
    assert len(a) == len(b)
    return [abs(x - y) / abs(y) for x, y in zip(a, b)]


@pytest.mark.slow
def test_two_fsdp_processes_train_as_one_process_does_on_the_same_global_batch(tmp_path, one_process):
    """Dense and MoE, 20 steps: FSDP (and DDP, already trusted) equal one process to fp32 reduction-order noise;
    each process holds half the parameters, gradients and AdamW state DDP does, as the plan says. Clipping by a
    rank's local gradient norm, or no gradient reduction at all, parts the losses within 5 steps."""
    from config import TrainConfig
    from training.plan import step_memory

    out = tmp_path / "losses.json"
    proc = torchrun(["-m", "tests.training.parallel.test_fsdp", "equality", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.load(open(out))
    for n in (0, 4):
        reference = one_process[n]["losses"]
        assert len(reference) == STEPS and reference[-1] < reference[0] - 0.1  # it learns
        for parallel in ("fsdp", "ddp"):
            assert max(relative_differences(got[f"{parallel} {n}"]["losses"], reference)) < EQUAL_REL, (parallel, n)
        ddp, fsdp = got[f"ddp {n}"]["held"], got[f"fsdp {n}"]["held"]
        for part in ("parameters", "gradients", "optimizer"):
            assert ddp[part] == one_process[n]["held"][part]  # a replica: the whole model
            assert 0.5 * ddp[part] <= fsdp[part] <= 0.52 * ddp[part], part  # half (and each tensor's step count)
        planned = step_memory(tiny_config(n), TrainConfig(batch_size=4, seq_len=32), "fp32", 2, "fsdp")[0]
        assert planned["weights"] == fsdp["parameters"] and planned["gradients"] == fsdp["gradients"]
    for broken in ("local clip", "no reduction"):  # the same check on each broken version fails
        for n in (0, 4):
            worst = max(relative_differences(got[f"{broken} {n}"]["losses"], one_process[n]["losses"][:5]))
            assert worst > 10 * EQUAL_REL, (broken, n, worst)  # measured: 5e-4 (local clip), 1e-2 (no reduction)


# ------------------------------------------------------------------------------------------ the pipeline
RUN = ["--preset", "micro", "--dense_steps=6", "--moe_steps=4", "--grown_steps=6", "--eval_interval=3",
       "--checkpoint_interval=2", "--log_interval=1", "--parallel=fsdp"]


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]


def losses(out_dir) -> list[tuple]:
    return [(r["kind"], r["phase"], r["step"], r["global_step"], r["loss"]) for r in records(out_dir)
            if r["kind"] in ("train", "eval")]


def train(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    return torchrun(["train_tinystories.py", *args], nproc)


def resume_here(run_dir: str) -> str:
    """--resume in this process (a sharded run on one process: a mesh of one); what it printed."""
    import contextlib
    import io

    import train_tinystories

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train_tinystories.main(["--out-dir", run_dir, "--resume"])
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Generated stories tokenized once: runs start without training a tokenizer."""
    from data.prepared import prepare_dataset

    out = str(tmp_path_factory.mktemp("prepared") / "micro-512")
    prepare_dataset(out, None, 512, origin="generated", offline_stories=2000, val_fraction=0.05, seed=1337, workers=1,
                    log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, prepared):
    """torchrun --nproc_per_node=2 train_tinystories.py --preset micro --parallel=fsdp (fewer steps): the reference."""
    out = tmp_path_factory.mktemp("fsdp")
    proc = train([*RUN, "--dataset", prepared, "--out-dir", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_two_sharded_processes_run_all_three_phases_verified_and_export(fsdp_run, tmp_path):
    import export_hf
    from training.run_state.checkpoint import latest_checkpoint

    out, stdout = fsdp_run
    assert stdout.count("VERIFICATION SUMMARY") == 1 and stdout.count("TRAINING SUMMARY") == 1  # rank 0 checks
    assert "✓ ALL CHECKS PASSED" in stdout and "device cpu" in stdout
    recs = records(out)
    assert recs[0]["world_size"] == 2 and recs[0]["settings"]["run"]["parallel"] == "fsdp"
    transitions = [r for r in recs if r["kind"] == "transition"]
    assert [t["stage"] for t in transitions] == ["moe", "grown"] and all(t["passed"] for t in transitions)
    assert len(transitions[1]["checks"]) == 5
    for t in transitions:  # the grown model, sharded on both ranks, starts where the small one ended
        assert abs(t["loss_after"] - t["loss_before"]) < 1e-5 * t["loss_before"]
    ckpt = latest_checkpoint(str(out))
    assert ckpt.meta["world_size"] == 2 and ckpt.meta["phase"] == "grown" and ckpt.meta["phase_done"]
    assert ckpt.load_model().num_parameters() == 2_755_712  # one whole model, read as any checkpoint is
    assert export_hf.main(["--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0


def keep_only(run_dir, name: str, into) -> str:
    """A copy of run_dir whose newest checkpoint is `name`, as if the run had died just after writing it."""
    shutil.copytree(run_dir, into)
    root = os.path.join(into, "checkpoints")
    for other in os.listdir(root):
        if other not in (name, "LATEST") and not other.startswith(("dense", "moe")):
            shutil.rmtree(os.path.join(root, other))
    open(os.path.join(root, "LATEST"), "w").write(name)
    return str(into)


def after(run: list[tuple], global_step: int) -> list[tuple]:
    return [r for r in run if r[3] > global_step]


def assert_continues(resumed: list[tuple], reference: list[tuple], from_step: int, rel: float) -> float:
    """resumed holds the reference's records up to from_step exactly, and its later losses within rel; returns the
    largest relative difference."""
    assert [r for r in resumed if r[3] <= from_step] == [r for r in reference if r[3] <= from_step]
    a, b = after(resumed, from_step), after(reference, from_step)
    assert [r[:4] for r in a] == [r[:4] for r in b] and a
    worst = max(relative_differences([r[4] for r in a], [r[4] for r in b]))
    assert worst < rel, worst
    return worst


@pytest.fixture(scope="module")
def broken_resume(fsdp_run, tmp_path_factory):
    """The reference run resumed mid-phase on one process by a deliberately broken version: AdamW's state is not
    restored (it restarts from nothing)."""
    import training.loop as loop

    real, loop._load_optimizer = loop._load_optimizer, lambda *a, **k: None
    try:
        run_dir = keep_only(fsdp_run[0], "grown-000002", tmp_path_factory.mktemp("broken") / "run")
        resume_here(run_dir)
    finally:
        loop._load_optimizer = real
    return losses(run_dir)


@pytest.mark.slow
def test_a_sharded_run_resumes_on_one_process_and_back_on_two(fsdp_run, broken_resume, tmp_path):
    """2 -> 1 from a checkpoint two processes wrote mid-phase, then 1 -> 2 from one the single process wrote: the
    losses continue as the uninterrupted 2-process run's, to reduction-order noise (one process sums the step's two
    micro-batches and the gradient norm in another order than two do); a resume that drops AdamW's state does not."""
    reference, start = losses(fsdp_run[0]), latest_step(fsdp_run[0], "grown-000002")
    one = keep_only(fsdp_run[0], "grown-000002", tmp_path / "one")
    assert "saved by 2 processes, on 1" in resume_here(one)
    print(f"2 -> 1: largest relative difference {assert_continues(losses(one), reference, start, EQUAL_REL):.1e}")
    two = keep_only(one, "grown-000004", tmp_path / "two")
    proc = train(["--out-dir", two, "--resume"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "saved by 1 process, on 2" in proc.stdout
    print(f"1 -> 2: largest relative difference {assert_continues(losses(two), reference, start + 2, EQUAL_REL):.1e}")
    worst = max(relative_differences(*([r[4] for r in after(run, start)] for run in (broken_resume, reference))))
    print(f"broken resume: largest relative difference {worst:.1e}")
    with pytest.raises(AssertionError):
        assert_continues(broken_resume, reference, start, 100 * EQUAL_REL)


def latest_step(run_dir, name: str) -> int:
    return json.load(open(os.path.join(run_dir, "checkpoints", name, "meta.json")))["global_step"]


def newest_step(run_dir) -> int:
    from training.run_state.checkpoint import list_checkpoints

    found = list_checkpoints(os.path.join(run_dir, "checkpoints"), verify=False)
    return found[-1].meta["global_step"] if found else -1


@pytest.mark.slow
def test_sigkill_of_a_sharded_run_at_random_moments_then_resume_continues_exactly(fsdp_run, broken_resume, prepared,
                                                                               tmp_path):
    """Both processes killed at once at a random moment after a checkpoint (mid-step, mid-transition or mid-save),
    twice; each resume takes the newest whole checkpoint, and the finished run's losses are the uninterrupted run's,
    bit for bit (the same world size sums in the same order). The broken resume's are not."""
    rng, out = random.Random(13), tmp_path / "run"
    for kill in range(2):
        args = ["--out-dir", str(out), "--resume"] if kill else [*RUN, "--dataset", prepared, "--out-dir", str(out)]
        before = newest_step(out)
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={free_port()}", "train_tinystories.py", *args], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while newest_step(out) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        assert proc.poll() is None, "the run ended before it could be killed"
        for pid in children(proc.pid) + [proc.pid]:  # both workers (torchrun starts each in its own session), then
            os.kill(pid, signal.SIGKILL)  # torchrun: no chance to clean up, as when a machine dies
        proc.wait()
    proc = train(["--out-dir", str(out), "--resume"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert losses(out) == losses(fsdp_run[0])
    assert broken_resume != losses(fsdp_run[0])


# ------------------------------------------------------------------------------------------ bf16
def compute_dtypes(model) -> list:
    """Records the dtype block 0's q_proj weight has when its forward runs (FSDP2 swaps in the unsharded copy)."""
    seen = []
    model.blocks[0].attention.q_proj.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    return seen


def first_gradients(rt, n_experts: int) -> dict | None:
    """The first step's gradients (the global batch's, reduced) of the tiny model in rt's mode and precision, whole on
    rank 0 (None elsewhere); the step's loss too. Every rank calls it."""
    from config import TrainConfig
    from data.tokens import StepBatches
    from models import build_model
    from training.loop import PhaseRun, accumulate_gradients, wrap_for_training

    torch.manual_seed(0)
    model = build_model(tiny_config(n_experts))
    batches = StepBatches(_tokens(), 4, 32, seed=1, rank=rt.rank, world_size=rt.world_size, streams=2)
    run = PhaseRun(rt, TrainConfig(batch_size=4, seq_len=32), batches, [], _Log())
    net = wrap_for_training(model, run)
    loss = rt.mean(accumulate_gradients(net, run, batches.micro_batches)[0]).item()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in
             model.named_parameters()}
    return {"loss": loss, "grads": grads} if rt.is_master else None


def relative_gradient_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all parameters' gradients together."""
    diff = sum(float((a[n].double() - b[n].double()).square().sum()) for n in b)
    return (diff / sum(float(g.double().square().sum()) for g in b.values())) ** 0.5


def bf16_worker(out: str) -> None:
    """precision=bf16 on 2 processes: FSDP (its MixedPrecisionPolicy) and DDP (autocast), dense and MoE: 20 steps'
    losses, the first step's gradients and the dtype block 0 computes with; then FSDP with no gradient reduction."""
    import training.loop as loop
    from training.parallel.runtime import setup_runtime, teardown_runtime

    rt, results = setup_runtime("cpu", "bf16"), {}
    real_train_phase = loop.train_phase

    def probed(model, *args, **kwargs):  # the dtype seen inside the training forward, whatever wraps the model
        results[key]["compute_dtype"] = compute_dtypes(model)
        return real_train_phase(model, *args, **kwargs)

    loop.train_phase = probed
    grads = {}
    for parallel in ("fsdp", "ddp", "no reduction"):
        if parallel == "no reduction":
            _break_gradient_reduction()
        rt.use_parallel("ddp" if parallel == "ddp" else "fsdp")
        for n_experts in (0, 4):
            key = f"{parallel} {n_experts}"
            results[key] = {}
            results[key].update(train_steps(rt, n_experts, STEPS if parallel != "no reduction" else 5))
            results[key]["compute_dtype"] = sorted({str(d) for d in results[key]["compute_dtype"]})
            grads[key] = first_gradients(rt, n_experts)
    if rt.is_master:
        for key in results:
            results[key]["first_loss"] = grads[key]["loss"]
            results[key]["gradient difference"] = relative_gradient_difference(
                grads[key]["grads"], grads[f"ddp {key.rsplit(' ', 1)[1]}"]["grads"])
        json.dump(results, open(out, "w"))
    teardown_runtime(rt)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_a_model_sharded_for_a_bf16_run_computes_with_bf16_weights(precision, dtype):
    """sharded_from (the pipeline's start and every transition) applies the run's mixed-precision policy: bf16 copies
    of the fp32 master weights inside the forward under precision=bf16, the fp32 weights themselves otherwise."""
    from models import build_model
    from training.parallel.runtime import Runtime, teardown_runtime
    from training.parallel.sharding import resharded, sharded_from

    rt = Runtime(torch.device("cpu"), precision=precision)
    rt.use_parallel("fsdp")
    try:
        model = sharded_from(build_model(tiny_config(4)), rt)
        seen = compute_dtypes(model)
        with rt.autocast():
            model(torch.zeros(1, 8, dtype=torch.long))
        masters = {p.dtype for p in resharded(model).parameters()}  # the root stays gathered after a forward
        assert seen == [dtype] and masters == {torch.float32}
    finally:
        teardown_runtime(rt)


@pytest.mark.slow
def test_fsdp_in_bf16_computes_with_bf16_weights_and_trains_as_ddp_under_autocast_does(tmp_path):
    """precision=bf16 + parallel=fsdp uses the mixed-precision policy (block 0's weights are bf16 inside its forward;
    DDP's stay fp32, autocast casting at each matmul), and its losses and first gradients match DDP's within what
    that difference allows (BF16_LOSS_REL, BF16_GRAD_REL); without gradient reduction they do not."""
    out = tmp_path / "bf16.json"
    proc = torchrun(["-m", "tests.training.parallel.test_fsdp", "bf16", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.load(open(out))
    for n in (0, 4):
        fsdp, ddp = got[f"fsdp {n}"], got[f"ddp {n}"]
        assert fsdp["compute_dtype"] == ["torch.bfloat16"] and ddp["compute_dtype"] == ["torch.float32"]
        assert ddp["losses"][-1] < ddp["losses"][0] - 0.1  # it learns
        worst = max(relative_differences(fsdp["losses"], ddp["losses"]))
        early = max(relative_differences(fsdp["losses"][:5], ddp["losses"][:5]))
        broken = got[f"no reduction {n}"]
        broken_early = max(relative_differences(broken["losses"], ddp["losses"][:5]))
        print(f"{n} experts, FSDP bf16 vs DDP bf16: losses {early:.1e} (5 steps) {worst:.1e} ({STEPS} steps) relative "
              f"at worst, first step's gradients {fsdp['gradient difference']:.1e}; without gradient reduction "
              f"{broken_early:.1e} (5 steps), gradients {broken['gradient difference']:.1e}")
        assert worst < BF16_LOSS_REL and early < BF16_EARLY_REL and fsdp["gradient difference"] < BF16_GRAD_REL
        assert broken_early > 5 * BF16_EARLY_REL and broken["gradient difference"] > 5 * BF16_GRAD_REL


if __name__ == "__main__":  # python -m torch.distributed.run --nproc_per_node=2 -m tests.training.parallel.test_fsdp equality|bf16 OUT
    if sys.argv[1] == "equality":
        equality_worker(sys.argv[2])
    elif sys.argv[1] == "bf16":
        bf16_worker(sys.argv[2])

"""The training loop's hot path (training/loop.py): no step reads the device except where it logs, evaluates or
saves; every parameter gets a gradient each step (so DDP need not look for unused ones); a NaN halts at the next
checked step naming the first non-finite one; batches are pinned for CUDA; the process group's timeout is derived
from the run. The 2-process parts run this file as a torchrun worker (bottom).

    python -m pytest tests/training/test_hot_loop.py -q                # counts printed with -s
"""
import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

from bench.host_reads import micro_phase
from bench.host_reads import reads_per_step as bench_reads_per_step
from config import ConfigError, RunConfig, TrainConfig
from models import build_model
from models.moe import EXPERT_IMPLS, grouped_mm_runs, set_expert_impl
from tests.conftest import tiny_config, tokens_for
from tests.helpers import ROOT, free_port
from training.parallel.runtime import DEFAULT_TIMEOUT, CollectiveTimeout, Runtime, collective_timeout

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


class _Log:
    def __init__(self):
        self.records = []

    def write(self, **r):
        self.records.append(r)


def reads_per_step(rt, n_experts: int, impl: str = "auto", accum: int = 1) -> tuple[float, list[str]]:
    """(host reads per ordinary step of the micro preset's model, where they come from): bench/host_reads.py."""
    r = bench_reads_per_step(rt, n_experts, impl, accum)
    return r["per_step"], r["where"]


CASES = [(0, "auto", "fp32"), (4, "grouped_mm", "bf16")]  # an MoE step with the sync-free expert path: bf16 on CPU


@pytest.mark.parametrize("n_experts, impl, precision", CASES)
def test_a_training_step_reads_nothing_from_the_device_between_logs(n_experts, impl, precision, single_thread):
    if n_experts and not grouped_mm_runs(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no grouped_mm on this torch's CPU build")
    rt = Runtime(torch.device("cpu"), precision=precision)
    per_step, extra = reads_per_step(rt, n_experts, impl, accum=2)
    print(f"{n_experts} experts, {precision}: {per_step} host reads per step {extra}")
    assert per_step == 0, extra
    last = micro_phase(rt, n_experts, 3, 3, impl, reads=True)[0]  # the halt check, the logged loss, the eval
    assert last[:2] == ["training/parallel/runtime.py:any", "training/loop.py:train_phase"] and len(last) <= 12


def test_the_count_bites_on_a_step_that_reads_its_loss(monkeypatch, single_thread):
    """The deliberately broken loop: a per-step loss.item() (the old way to watch for NaN) is found, and named."""
    import training.loop as loop

    real = loop.accumulate_gradients

    def reading(net, run, k):
        loss, total, balance = real(net, run, k)
        if not torch.isfinite(total).item():
            raise loop.TrainingDiverged("nan")
        return loss, total, balance

    monkeypatch.setattr(loop, "accumulate_gradients", reading)
    per_step, extra = reads_per_step(Runtime(torch.device("cpu")), 0)
    assert per_step == 1 and extra == ["tests/training/test_hot_loop.py:reading"]


def test_the_expert_loop_path_pays_its_own_read_and_is_counted(single_thread):
    """The fp32 eager expert loop (the CPU default) splits the tokens by a host list of counts: one read per MoE layer
    per forward, counted and named, so the zero above is not blindness to the model's reads."""
    per_step, extra = reads_per_step(Runtime(torch.device("cpu")), 4, "loop")
    assert per_step == 2 and extra == ["models/moe.py:_loop_experts"]  # the micro preset's 2 layers


# --------------------------------------------------------------------------------- DDP: no unused parameters
def parameters_without_gradient(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.grad is None]


def _collapsed(model):
    """Every router zero: all tokens go to the same top_k experts, the others get none."""
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block.ffn, "router"):
                block.ffn.router.weight.zero_()
    return model


@pytest.mark.parametrize("impl", [i for i in EXPERT_IMPLS if i != "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_idle_experts_get_a_zero_gradient_not_none_so_ddp_needs_no_unused_parameter_search(impl, dtype, single_thread):
    """The reason training/loop.py wraps DDP with find_unused_parameters=False, MoE included: experts are stacked
    tensors, so an expert without tokens has zero rows in their gradient. Checked on every expert path with a
    collapsed router (2 of 4 experts idle); an extra parameter the forward never uses is found by the same test."""
    from training.loop import lm_loss

    if impl == "grouped_mm" and not grouped_mm_runs(torch.device("cpu"), dtype):
        pytest.skip("no grouped_mm for this dtype on this torch's CPU build")
    t = tokens_for(2, 33)
    torch.manual_seed(0)
    model = set_expert_impl(_collapsed(build_model(tiny_config(n_experts=4, top_k=2))), impl)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        lm_loss(model, t[:, :-1], t[:, 1:], TrainConfig())[1].backward()
    assert parameters_without_gradient(model) == []
    for block in model.blocks:
        idle = [(g.flatten(1).abs().sum(1) == 0).sum().item() for g in (block.ffn.gate_proj.grad,
                                                                       block.ffn.down_proj.grad)]
        assert idle == [2, 2]
    model.unused = torch.nn.Linear(2, 2)  # the broken model: a parameter no forward reaches
    lm_loss(model, t[:, :-1], t[:, 1:], TrainConfig())[1].backward()
    assert parameters_without_gradient(model) == ["unused.weight", "unused.bias"]


def test_a_dense_model_gets_every_gradient_too():
    from training.loop import lm_loss

    t = tokens_for(2, 33)
    model = build_model(tiny_config())
    lm_loss(model, t[:, :-1], t[:, 1:], TrainConfig())[1].backward()
    assert parameters_without_gradient(model) == []


# --------------------------------------------------------------------------------- NaN: found at the next check
def _diverging_phase(monkeypatch, poison_from: int, log_interval: int, value: float = float("nan")):
    import training.loop as loop
    from data.tokens import TokenBatches

    real, calls = loop.lm_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, total = real(*args, **kwargs)
        calls["n"] += 1
        return loss, total * value if calls["n"] >= poison_from else total

    monkeypatch.setattr(loop, "lm_loss", poisoned)
    torch.manual_seed(0)
    model = build_model(tiny_config())
    tokens = tokens_for(8, 65).flatten().numpy().astype("uint16")
    saved = []
    tc = TrainConfig(warmup_steps=1, log_interval=log_interval, eval_interval=100, checkpoint_interval=100)
    run = loop.PhaseRun(Runtime(torch.device("cpu")), tc, TokenBatches(tokens, 2, 16, seed=0), [], _Log(),
                        save=lambda m, o, st: saved.append(st.step))
    with pytest.raises(loop.TrainingDiverged) as e:
        loop.train_phase(model, loop.Phase("dense", "", 20, 1e-3), run)
    return str(e.value), [r["step"] for r in run.log.records], saved


def test_a_nan_is_found_at_the_next_logged_step_naming_the_first_non_finite_one(monkeypatch):
    message, logged, saved = _diverging_phase(monkeypatch, poison_from=6, log_interval=4)
    assert message == ("loss became nan at dense step 8 (non-finite since step 6; checked at steps that log, "
                       "evaluate or save)")
    assert logged == [4] and saved == []  # nothing after the divergence is logged or saved


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_a_nan_on_a_logged_step_is_named_at_that_step_with_its_value(monkeypatch, value, shown):
    message, logged, _ = _diverging_phase(monkeypatch, poison_from=4, log_interval=4, value=value)
    assert message == f"loss became {shown} at dense step 4" and logged == []


# --------------------------------------------------------------------------------- batches for CUDA
def test_batches_stay_pageable_off_cuda_and_keep_their_values():
    from data.tokens import StepBatches
    from training.loop import to_device

    tokens = tokens_for(8, 65).flatten().numpy().astype("uint16")
    x, y = StepBatches(tokens, 2, 16, seed=0).next()
    assert to_device(x, torch.device("cpu")) is x and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_pinned_and_copied_without_blocking_equal_to_pageable_ones():
    from data.tokens import StepBatches
    from training.loop import to_device

    tokens = tokens_for(8, 65).flatten().numpy().astype("uint16")
    pinned, pageable = (StepBatches(tokens, 4, 16, seed=0, world_size=2, streams=2, pin_memory=p) for p in (1, 0))
    x, reference = pinned.next()[0], pageable.next()[0]
    assert x.is_pinned() and torch.equal(x, reference)
    torch.cuda.set_sync_debug_mode("error")  # a blocking copy raises
    try:
        on_gpu = to_device(x, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(on_gpu.cpu(), reference)


# --------------------------------------------------------------------------------- the process group's timeout
def test_the_timeout_is_torchs_default_for_small_runs_and_grows_with_the_work_rank_0_does_alone():
    assert collective_timeout(0, 1_000_000, 512, 10 << 20) == DEFAULT_TIMEOUT == timedelta(minutes=10)
    text = collective_timeout(1_900_000_000, 1_000_000, 512, 10 << 20)  # the full TinyStories tokenized by rank 0
    assert text == timedelta(seconds=2 * 1.9e9 / 0.25e6)
    checks = collective_timeout(0, 1_000_000_000, 8 * 1024, 0)  # checks of a 1B model: 2 x 1e-9 x 1e9 x 8192 s
    assert checks == timedelta(seconds=16384)


def test_the_timeout_can_be_set_and_a_negative_one_is_refused():
    from training.pipeline import collective_timeout_for
    from training.settings import RunRequest, build_settings

    s = build_settings("micro", {"run": {"collective_timeout": 90.0}})
    assert collective_timeout_for(RunRequest(s, "out")) == timedelta(seconds=90)
    derived = collective_timeout_for(RunRequest(build_settings("cpu"), "out"))  # hub text, rank 0 tokenizes it all
    assert derived > timedelta(hours=1)
    with pytest.raises(ConfigError, match="collective_timeout=-1 must be >= 0"):
        RunConfig(collective_timeout=-1)


def test_a_timed_out_collective_names_the_timeout_and_the_setting_to_raise():
    rt = Runtime(torch.device("cpu"), rank=1, world_size=2, timeout=timedelta(seconds=1200))
    e = rt.timed_out(RuntimeError("[gloo] Timed out waiting 1200000ms for recv operation to complete"))
    assert isinstance(e, CollectiveTimeout) and "waited 1200 s" in str(e) and "--collective_timeout=" in str(e)
    other = RuntimeError("Connection closed by peer")
    assert rt.timed_out(other) is other  # a dead peer is PeerWatch's to report


# --------------------------------------------------------------------------------- two processes (torchrun)
def torchrun_worker(out: str) -> None:
    """Host reads per step on 2 processes (DDP, gloo) with the stop vote, and with the old stop check (a flag
    all-reduced on the default group and read every step); then a wait past a 5 s timeout on rank 1."""
    import time

    import torch.distributed as dist

    import training.loop as loop
    from training.parallel.runtime import setup_runtime

    rt = setup_runtime("cpu", "fp32", timeout=timedelta(seconds=5))
    result = {"vote": reads_per_step(rt, 0)}
    if grouped_mm_runs(torch.device("cpu"), torch.bfloat16):  # DDP over an MoE: no unused-parameter search's reads
        rt.precision = "bf16"
        result["moe"] = reads_per_step(rt, 4, "grouped_mm")
        rt.precision = "fp32"
    real = loop._stop_if_requested

    def old_stop_check(model, opt, run, state, start_step, vote):  # the code before issue 20
        if run.rt.any(torch.tensor(run.stop_requested() is not None, device=run.rt.device)):
            raise loop.TrainingInterrupted("SIGTERM", None)

    loop._stop_if_requested = old_stop_check
    result["old"] = reads_per_step(rt, 0)
    loop._stop_if_requested = real
    if rt.rank == 0:
        time.sleep(12)  # rank 0 "prepares data" past the timeout while rank 1 waits for its verdict
    try:
        rt.broadcast_flag(True)
        result["timeout"] = None
    except CollectiveTimeout as e:
        result["timeout"] = str(e)
    except RuntimeError as e:  # rank 0: its peer gave up
        result["timeout"] = f"other: {e}"
    json.dump(result, open(f"{out}.{rt.rank}", "w"))
    rt.watch.stop()
    os._exit(0)  # the group is broken by design: no teardown


@pytest.mark.slow
def test_two_processes_read_only_the_stop_vote_per_step_and_a_late_rank_0_is_a_named_timeout(tmp_path):
    out = tmp_path / "reads"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "tests.training.test_hot_loop", "worker", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.load(open(f"{out}.{r}")) for r in (0, 1)]
    for r in ranks:
        for case in ("vote", "moe") if "moe" in r else ("vote",):  # before issue 20 the MoE read 23 (DDP's search)
            per_step, where = r[case]
            assert per_step == 1 and where == ["training/parallel/runtime.py:finish"], case  # a CPU tensor
        per_step, where = r["old"]
        assert per_step == 1 and where == ["training/parallel/runtime.py:any"]  # the default group's: on the GPU
    assert "rank 1 waited 5 s" in ranks[1]["timeout"] and "--collective_timeout=" in ranks[1]["timeout"]


class _Done:
    def wait(self):
        return True


def test_the_stop_vote_answers_a_step_late_on_a_cpu_tensor_whatever_the_device(monkeypatch):
    """Every rank gets the same answer at the same step, one step after the signal; what makes its per-step read no
    host-device sync on a GPU: the vote never holds a device tensor."""
    import torch.distributed as dist

    from training.parallel.runtime import StopVote

    posted = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: posted.append((t.device.type, t.item())) or _Done())
    vote = StopVote(group=object())  # one rank's view; the fake all-reduce returns its own flag
    assert [vote.post(False), vote.post(True), vote.post(False)] == [False, False, True]
    assert posted == [("cpu", 0), ("cpu", 1)]  # the third post found the second's vote true: all stop, none posted
    assert not vote.finish()  # nothing left in flight


if __name__ == "__main__":  # python -m torch.distributed.run --nproc_per_node=2 -m tests.training.test_hot_loop worker OUT
    if sys.argv[1] == "worker":
        torchrun_worker(sys.argv[2])

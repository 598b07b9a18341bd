"""CUDA-only tests (`python -m pytest -m cuda tests/training/parallel/test_cuda.py`; bench/gpu_check.sh runs them): bf16 autocast,
fused attention kernels, fused AdamW, torch.compile, activation checkpointing's memory, the plan's memory
estimate, float64 gradient accumulation and the growth checks, all on the GPU. Skipped where torch sees no
CUDA device, with that reason."""
import copy
import math

import pytest
import torch

from bench.phase_throughput import RandomTokens, Target, measure_phase, train_steps
from config import TrainConfig
from models import build_model
from tests.conftest import tiny_config, tokens_for
from training.loop import PhaseRun, accumulate_gradients, wrap_for_training, lm_loss, make_optimizer
from training.parallel.runtime import Runtime

NO_CUDA = "CUDA test: torch.cuda.is_available() is False (no GPU, or a CPU build of torch)"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

CUDA = torch.device("cuda")
TC = TrainConfig(warmup_steps=0, grad_clip=1.0)  # full learning rate from the first step: the steps differ visibly


class _NoLog:
    def write(self, **record) -> None:
        pass


def _model(n_experts: int = 0, **overrides) -> torch.nn.Module:
    """head_dim 64, the cuda preset's: the size the fused attention kernels are tuned for."""
    torch.manual_seed(0)
    shape = dict(vocab_size=512, dim=256, n_heads=4, max_seq_len=256, n_experts=n_experts, top_k=2) | overrides
    return build_model(tiny_config(**shape)).to(CUDA)


def _train(model: torch.nn.Module, precision: str, steps: int = 3, compile: bool = False) -> list[float]:
    """Losses of `steps` of the loop's optimizer steps on seeded random batches (4 x 128)."""
    rt = Runtime(CUDA, precision=precision)
    run = PhaseRun(rt, TC, RandomTokens(model.config.vocab_size, 4, 128, CUDA, seed=0), [], _NoLog(), compile=compile)
    losses = train_steps(wrap_for_training(model, run), make_optimizer(model, 1e-3, TC), run, 1e-3, range(steps), steps)
    return losses.tolist()


@pytest.fixture
def no_tf32():
    """Plain fp32 matmuls: setup_runtime turns TF32 on, whose 10-bit mantissa would hide a 1e-4 difference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------ precision
def _gradient(model: torch.nn.Module, precision: str) -> torch.Tensor:
    """Every parameter's gradient of one objective backward, flattened into one float64 vector."""
    x, y = RandomTokens(model.config.vocab_size, 4, 128, CUDA, seed=0).next()
    with Runtime(CUDA, precision=precision).autocast():
        total = lm_loss(model, x, y, TC)[1]
    total.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


@pytest.mark.parametrize("n_experts", [0, 4])
def test_bf16_autocast_steps_are_finite_and_close_to_fp32(n_experts, no_tf32):
    """Three steps from one init on the same batches. bf16 rounds each matmul's inputs to 8 mantissa bits; the
    losses stay within 5e-3 relative of fp32's (bf16 autocast on a CPU: 1e-4 to 3e-4) and the first gradient
    points the same way (cosine > 0.99, norm within 5%): a wrong cast or a lost gradient fails one of them."""
    fp32, bf16 = _train(_model(n_experts), "fp32"), _train(_model(n_experts), "bf16")
    assert all(math.isfinite(x) for x in bf16)
    assert bf16 == pytest.approx(fp32, rel=5e-3)
    assert bf16 != fp32  # autocast really ran in bf16
    g32, g16 = _gradient(_model(n_experts), "fp32"), _gradient(_model(n_experts), "bf16")
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99
    assert g16.norm() / g32.norm() == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_attention_runs_on_a_fused_sdpa_kernel_under_bf16_autocast(backend):
    """SDPA restricted to one fused kernel (no math fallback: torch raises "No available kernel" otherwise):
    forward and backward still run, so the q, k, v the model passes qualify (dtype, head_dim, layout), and the
    loss is the math kernel's within 1e-2 relative (bf16 rounding in both)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, rt = _model(), Runtime(CUDA, precision="bf16")
    x, y = RandomTokens(512, 4, 256, CUDA, seed=0).next()

    def loss_with(kernel: SDPBackend) -> float:
        model.zero_grad(set_to_none=True)
        with sdpa_kernel([kernel]):
            with rt.autocast():
                loss = lm_loss(model, x, y, TC)[0]
            loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        return loss.item()

    assert loss_with(getattr(SDPBackend, backend)) == pytest.approx(loss_with(SDPBackend.MATH), rel=1e-2)


# ------------------------------------------------------------------------------------------ optimizer, compile
def test_make_optimizer_is_fused_on_cuda_and_steps_as_the_plain_adamw(no_tf32):
    """The fused kernel and the single-tensor loop apply the same update to the same gradients: within 1e-6
    (the step itself is ~lr = 1e-3; fused only reorders fp32 arithmetic)."""
    model = _model(4)
    reference = copy.deepcopy(model)
    opt = make_optimizer(model, 1e-3, TC)
    assert opt.defaults["fused"]
    ref_params = dict(reference.named_parameters())
    by_id = {id(p): name for name, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "fused": False, "foreach": False,
               "params": [ref_params[by_id[id(p)]] for p in g["params"]]} for g in opt.param_groups]
    ref_opt = torch.optim.AdamW(groups, foreach=False, fused=False)
    x, y = RandomTokens(512, 4, 128, CUDA, seed=0).next()
    for _ in range(2):
        lm_loss(model, x, y, TC)[1].backward()
        for name, p in model.named_parameters():
            ref_params[name].grad = None if p.grad is None else p.grad.clone()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("n_experts", [0, 4])
def test_compiled_training_gives_the_eager_losses(n_experts, no_tf32):
    """fp32, three steps from one init through the loop's compile wrapper: Inductor fuses and reorders float sums,
    so the first loss (same weights) agrees to 1e-5 and the later ones to 1e-3 relative, not bitwise."""
    torch._dynamo.reset()
    eager = _train(_model(n_experts), "fp32")
    compiled = _train(_model(n_experts), "fp32", compile=True)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled == pytest.approx(eager, rel=1e-3)


# ------------------------------------------------------------------------------------------ MoE dispatch
def _moe_layer(impl: str):
    from models.moe import MoEFeedForward
    torch.manual_seed(0)
    moe = MoEFeedForward(256, 704, 8, 2).to(CUDA)  # the cuda preset's phase-2 layer
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe.impl = impl
    return moe


def _moe_step(moe, x: torch.Tensor) -> list[torch.Tensor]:
    """bf16 autocast forward + backward of the layer: output and every gradient, in fp32."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = moe(x)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=CUDA).view_as(y)).sum().backward()
    return [y.float(), x.grad.float()] + [p.grad.float() for p in moe.parameters()]


def test_grouped_mm_moe_equals_the_loop_in_bf16_and_never_syncs():
    """The grouped-matmul path on the device's kernels: value and gradients within bf16 tolerance of the loop's,
    forward and backward with torch.cuda.set_sync_debug_mode("error") (any host sync raises)."""
    from models.moe import grouped_mm_runs
    if not grouped_mm_runs(CUDA, torch.bfloat16):
        pytest.skip("no grouped_mm for this GPU and torch")
    x = torch.randn(4096, 256, device=CUDA)
    ref = _moe_step(_moe_layer("loop"), x)
    grouped = _moe_layer("grouped_mm")
    _moe_step(grouped, x)  # warm-up: first calls may synchronise (allocator, kernel loading)
    for p in grouped.parameters():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _moe_step(grouped, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=0, atol=3e-2 * r.abs().max().item())


def test_moe_model_compiles_fullgraph_in_bf16_and_equals_eager():
    """The MoE training forward + backward as one Inductor graph (fullgraph=True) on the GPU: loss and gradients
    within bf16 tolerance of eager's, with and without activation checkpointing."""
    x, y = RandomTokens(512, 4, 128, CUDA, seed=0).next()
    for checkpointing in (False, True):
        torch._dynamo.reset()
        results = []
        for compiled in (False, True):
            model = _model(4)
            model.activation_checkpointing = checkpointing
            net = torch.compile(model, fullgraph=True) if compiled else model
            with torch.autocast("cuda", dtype=torch.bfloat16):
                total = lm_loss(net, x, y, TC)[1]
            total.backward()
            results.append((total.item(), [p.grad.float() for p in model.parameters()]))
        (loss_e, grads_e), (loss_c, grads_c) = results
        assert loss_c == pytest.approx(loss_e, rel=1e-2)
        for g, r in zip(grads_c, grads_e):
            assert torch.allclose(g, r, rtol=0, atol=5e-2 * max(r.abs().max().item(), 1e-6))


# ------------------------------------------------------------------------------------------ memory
def test_activation_checkpointing_lowers_peak_cuda_memory():
    """6 blocks, 8 x 256 tokens, fp32: without checkpointing each block keeps ~25 MB for backward; with it only the
    blocks' inputs plus one block's recomputation are held. Peak above the weights: checkpointed < 0.6 x plain."""
    model = _model(n_layers=6)
    x, y = RandomTokens(512, 8, 256, CUDA, seed=0).next()

    def peak(on: bool) -> int:
        model.activation_checkpointing = on
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lm_loss(model, x, y, TC)[1].backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    plain, checkpointed = peak(False), peak(True)
    assert checkpointed < 0.6 * plain, (checkpointed, plain)


@pytest.mark.parametrize("phase,precision", [("dense", "bf16"), ("moe", "bf16"), ("grown", "bf16"),
                                             ("dense", "fp32")])
def test_plan_memory_estimate_is_within_its_margin_of_the_measured_peak(phase, precision):
    """training.plan's training-step peak for the cuda preset's shapes at batch 8 x 512 (eager, two steps, so
    AdamW's state exists) against torch.cuda.max_memory_allocated: within the plan's stated MEMORY_MARGIN."""
    plan_module = pytest.importorskip("training.plan")
    from training.stages import PIPELINE, stage_configs
    from training.settings import build_settings

    s = build_settings("cuda", {"run": {"precision": precision, "device": "cuda"}, "train": {"batch_size": 8}})
    index = [st.name for st in PIPELINE].index(phase)
    planned = plan_module.make_plan(s, device_type="cuda").phases[index].memory.step_peak
    target = Target(None, {phase: {"planned_step_peak_bytes": planned}}, "ok")
    record = measure_phase(stage_configs(s)[index], phase, s, Runtime(CUDA, precision=precision), 1, 1, target)
    margin = plan_module.MEMORY_MARGIN
    assert abs(record["memory_ratio"] - 1) <= margin, (record["peak_memory_bytes"], planned)


# ------------------------------------------------------------------------------------------ float64 equalities
def _float64_model(n_experts: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_config(n_experts=n_experts, top_k=2)).double().to(CUDA)


class _Batches:
    def __init__(self, batches: list):
        self.batches = batches

    def next(self):
        return self.batches.pop(0)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_experts", [0, 4])
def test_accumulated_micro_batches_give_the_whole_batch_gradient_on_cuda_in_float64(n_experts):
    """Three micro-batches through accumulate_gradients against one backward over their concatenation: equal to
    1e-12 relative in float64 (the balance loss is per micro-batch by design, so it is off here)."""
    tc = TrainConfig(balance_coef=0.0, z_coef=1e-3)
    t = tokens_for(6, 17).to(CUDA)
    micro = [(t[i:i + 2, :-1], t[i:i + 2, 1:]) for i in (0, 2, 4)]
    model = _float64_model(n_experts)
    run = PhaseRun(Runtime(CUDA, precision="fp32"), tc, _Batches(list(micro)), [], _NoLog())
    accumulate_gradients(model, run, len(micro))
    accumulated = _grads(model)
    model.zero_grad(set_to_none=True)
    lm_loss(model, t[:, :-1], t[:, 1:], tc)[1].backward()
    whole = _grads(model)
    assert accumulated.keys() == whole.keys()
    for name, g in whole.items():
        assert (accumulated[name] - g).abs().max() <= 1e-12 * g.abs().max().clamp(min=1e-300), name


def test_growth_checks_pass_on_cuda_and_still_catch_pure_clones():
    """Both transitions grown and checked on the GPU (the checks work on float64 copies on the models' device);
    zero symmetry-breaking noise still fails the symmetry check there."""
    from transfer import dense_to_moe, detailed_growth_check, scale_bilaterally, upcycling_check

    torch.manual_seed(0)
    dense = build_model(tiny_config()).to(CUDA)
    calib = tokens_for(4, 64).to(CUDA)
    moe = dense_to_moe(dense, 4, 2, seed=0, calibration_tokens=calib)
    assert upcycling_check(dense, moe, calib, verbose=False).passed
    grown = scale_bilaterally(moe, 2, 1, noise_std=0.3, seed=0, calibration_tokens=calib)
    assert next(grown.parameters()).device.type == CUDA.type
    report = detailed_growth_check(moe, grown, calib, verbose=False)
    assert report.passed, report.summary()
    clones = scale_bilaterally(moe, 2, 1, noise_std=0.0, seed=0, calibration_tokens=calib)
    assert not detailed_growth_check(moe, clones, calib, verbose=False).results["symmetry"].passed

"""training/roofline.py: the expected MFU from the shapes (matmuls against the ridge point, elementwise bytes,
per-kernel overhead), its kernel counts recounted on the real step, and a recorded measurement winning over it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import training.roofline as rl
from config import ModelConfig, TrainConfig
from models import build_model
from training.loop import lm_loss, make_optimizer
from training.stages import stage_configs
from training.plan import make_plan
from training.settings import apply, build_settings, parse_overrides

H100 = "NVIDIA H100 80GB HBM3"


class _Ops(TorchDispatchMode):
    """Counts the non-view aten ops that run (each one kernel, or one small host-side op, on a GPU)."""

    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            _Ops.n += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(n_layers: int, n_experts: int, checkpointing: bool) -> int:
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=512, dim=64, n_layers=n_layers, n_heads=4, max_seq_len=64,
                                    n_experts=n_experts, top_k=2))
    model.activation_checkpointing = checkpointing
    tc = TrainConfig()
    opt = make_optimizer(model, 1e-3, tc)
    x = torch.randint(0, 512, (2, 33))
    for _ in range(2):  # the second step: AdamW's state exists
        _Ops.n = 0
        with _Ops():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lm_loss(model, x[:, :-1], x[:, 1:], tc)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return _Ops.n


@pytest.mark.parametrize("kind,n_experts", [("dense", 0), ("moe", 8)])
def test_kernel_counts_are_the_steps_own(kind, n_experts, single_thread):
    """KERNELS per block (and recomputed under checkpointing) and for the rest, recounted: within 10%."""
    two, four = _ops_per_step(2, n_experts, False), _ops_per_step(4, n_experts, False)
    per_block = (four - two) / 2
    assert per_block == pytest.approx(rl.KERNELS[kind], rel=0.1)
    assert two - 2 * per_block == pytest.approx(rl.KERNELS["head_and_optimizer"], rel=0.1)
    recompute = (_ops_per_step(4, n_experts, True) - _ops_per_step(2, n_experts, True)) / 2 - per_block
    assert recompute == pytest.approx(rl.KERNELS[f"{kind}_recompute"], rel=0.15)


def test_small_matmuls_are_charged_their_bytes_large_ones_their_flops():
    peak, bw = 989.4e12, 3.35e12  # H100 SXM: ridge point ~295 FLOP per byte
    small = rl._matmul_s(32768, 704, 256, peak, bw)  # dim 256: ~190 FLOP per byte, below the ridge
    assert small == pytest.approx(2 * (32768 * 256 + 256 * 704 + 32768 * 704) / bw)
    big = rl._matmul_s(8192, 8192, 8192, peak, bw)
    assert big == pytest.approx(2 * 8192 ** 3 / (peak * rl.GEMM_EFFICIENCY))


def test_cuda_preset_expected_mfu_is_far_below_the_old_flat_35_percent_and_compile_helps():
    s = build_settings("cuda")
    for cfg in stage_configs(s):
        eager = rl.expected_mfu(cfg, s.train, H100, "bf16")
        compiled = rl.expected_mfu(cfg, s.train, H100, "bf16", compiled=True)
        assert eager.source == "roofline" and 0.03 < eager.mfu < 0.30 and compiled.mfu > eager.mfu
    dense, moe, grown = (rl.expected_mfu(c, s.train, H100, "bf16").mfu for c in stage_configs(s))
    assert grown > dense  # dim 512 sits nearer the ridge point than dim 256
    assert rl.expected_mfu(stage_configs(s)[0], s.train, "Some Unknown GPU", "bf16") is None


def test_the_plan_takes_a_recorded_measurement_over_the_roofline_and_says_which(monkeypatch):
    s = build_settings("cuda")
    roofline = make_plan(s, device_type="cuda")
    assert {p.mfu_source for p in roofline.phases} == {"roofline"}
    assert roofline.phases[2].seconds == pytest.approx(roofline.phases[2].flops / (989.4e12 * roofline.phases[2].mfu))
    grown = stage_configs(s)[2]
    monkeypatch.setattr(rl, "MEASURED_MFU", {"H100": {f"grown/{grown.dim}x{grown.n_layers}/e{grown.n_experts}/eager": 0.2}})
    plan = make_plan(s, device_type="cuda")
    assert [p.mfu_source for p in plan.phases] == ["roofline", "roofline", "measured"] and plan.phases[2].mfu == 0.2
    assert "measured by bench/gpu_check.sh" in plan.table() and "derived from the shapes" in plan.table()
    compiled = make_plan(apply(s, parse_overrides(["--compile=true"])), device_type="cuda")
    assert compiled.phases[2].mfu_source == "roofline" and compiled.seconds < roofline.seconds
    assert "(compiled;" in compiled.table()


def test_a_gpu_without_a_bandwidth_figure_falls_back_to_the_stated_default(monkeypatch):
    monkeypatch.setattr(rl, "GPU_BANDWIDTH", ())
    plan = make_plan(build_settings("cuda"), device_type="cuda")
    assert {p.mfu_source for p in plan.phases} == {"assumed"} and {p.mfu for p in plan.phases} == {0.35}
    assert "no bandwidth figure" in plan.table()

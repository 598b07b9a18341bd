import math

import pytest
import torch

from config import TrainConfig
from models import build_model
from tests.conftest import tiny_config, tokens_for
from training.loop import evaluate, lm_loss, lr_at, make_optimizer
from training.runtime import Runtime


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    tc = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 110, 1.0, tc) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[-1] > 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(500, 110, 1.0, tc) == pytest.approx(0.1)


def test_a_held_phase_keeps_its_lr_after_warm_up():
    tc = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, 100, 1.0, tc, decays=False) for s in (0, 9, 10, 50, 99)] == [0.1, 1.0, 1.0, 1.0, 1.0]
    assert lr_at(99, 100, 1.0, tc) < 0.11


def test_optimizer_decays_matrices_but_not_norm_weights():
    model = build_model(tiny_config())
    opt = make_optimizer(model, 1e-3, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_optimizer_is_fused_where_torch_has_the_kernel_and_falls_back_where_not(monkeypatch):
    model = build_model(tiny_config())
    assert make_optimizer(model, 1e-3, TrainConfig()).defaults["fused"]  # CPU kernel: torch >= 2.4
    real = torch.optim.AdamW

    def no_fused_kernel(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    opt = make_optimizer(model, 1e-3, TrainConfig())
    assert not opt.defaults["fused"] and len(opt.param_groups) == 2


def test_moe_objective_adds_balance_and_z_losses_and_eval_matches_lm_loss():
    torch.manual_seed(0)
    model = build_model(tiny_config(n_experts=4))
    x = tokens_for(2, 33)
    inputs, targets = x[:, :-1], x[:, 1:]
    tc = TrainConfig(balance_coef=0.01, z_coef=0.001)
    loss, total = lm_loss(model, inputs, targets, tc)
    assert total.item() > loss.item() and math.isfinite(total.item())
    assert lm_loss(model, inputs, targets, TrainConfig(balance_coef=0, z_coef=0))[1].item() == pytest.approx(loss.item())
    assert evaluate(model, [(inputs, targets)], Runtime(torch.device("cpu"))) == pytest.approx(loss.item(), rel=1e-6)

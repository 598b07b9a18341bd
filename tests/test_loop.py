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


class _Log:
    def __init__(self):
        self.records = []

    def write(self, **r):
        self.records.append(r)


def test_train_phase_returns_its_state_and_saves_through_the_state_alone():
    from data.tokens import TokenBatches
    from training.loop import Phase, PhaseRun, TrainingState, train_phase

    torch.manual_seed(0)
    model = build_model(tiny_config(n_experts=2, top_k=1))
    tokens = tokens_for(4, 65).flatten().numpy().astype("uint16")
    batches = TokenBatches(tokens, 2, 16, seed=0)
    val = [(tokens_for(2, 17)[:, :-1], tokens_for(2, 17)[:, 1:])]
    saved = []
    tc = TrainConfig(warmup_steps=1, eval_interval=3, checkpoint_interval=2, log_interval=1)
    run = PhaseRun(Runtime(torch.device("cpu")), tc, batches, val, _Log(),
                   save=lambda m, opt, st: saved.append(st.state_dict()))
    state = TrainingState(global_step=10)
    state.begin("moe")
    out = train_phase(model, Phase("moe", "MoE", 5, 1e-3), run, state)
    assert out is state and (out.step, out.global_step, out.phase_done) == (5, 15, True)
    assert out.data_position == batches.state_dict() and out.data_position["step"] == 5
    evals = [r for r in run.log.records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 5] and out.eval_losses == {"moe": evals[-1]["loss"]}
    assert [(d["step"], d["phase_done"], d["global_step"]) for d in saved] == [(2, False, 12), (4, False, 14), (5, True, 15)]
    assert saved[0]["eval_losses"] == {}  # an unfinished phase has no final eval loss yet

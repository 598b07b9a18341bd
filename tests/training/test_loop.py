import math

import pytest
import torch

from config import TrainConfig
from models import build_model
from tests.conftest import tiny_config, tokens_for
from training.loop import evaluate, lm_loss, lr_at, make_optimizer
from training.parallel.runtime import Runtime


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


# ------------------------------------------------------------------ accumulation and activation checkpointing
class _Stream:
    """The batches object train_phase reads: fixed (x, y) micro-batches in order."""

    def __init__(self, batches):
        self.batches, self.step = list(batches), 0

    def next(self):
        self.step += 1
        return self.batches[self.step - 1]

    def state_dict(self):
        return {"step": self.step}


def _float64_model(n_experts=0):
    torch.manual_seed(0)
    return build_model(tiny_config(n_experts=n_experts, top_k=min(2, n_experts) or 2)).double()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_grad_difference(a, b):
    assert a.keys() == b.keys()
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-300)).item() for n in a)


def _accumulated(model, micro_batches, tc, accumulate=None):
    from training.loop import PhaseRun, accumulate_gradients

    run = PhaseRun(Runtime(torch.device("cpu")), tc, _Stream(micro_batches), [], _Log())
    model.zero_grad(set_to_none=True)
    (accumulate or accumulate_gradients)(model, run, len(micro_batches))
    return _grads(model)


def _whole_batch(model, micro_batches, tc):
    x, y = (torch.cat(t) for t in zip(*micro_batches))
    model.zero_grad(set_to_none=True)
    lm_loss(model, x, y, tc)[1].backward()
    return _grads(model)


def _broken_accumulation(net, run, k):  # forgets to divide each micro-batch's loss by k
    for _ in range(k):
        x, y = run.batches.next()
        lm_loss(net, x, y, run.train)[1].backward()


@pytest.mark.parametrize("n_experts", [0, 4])
def test_k_accumulated_micro_batches_give_the_gradient_of_the_k_times_larger_batch(n_experts):
    """float64: cross-entropy and z-loss are means over tokens, so the accumulated gradient is the whole batch's
    to rounding (1e-12). The balance loss is per micro-batch (as Megatron computes it): it is left out here and
    checked on its own below."""
    tc = TrainConfig(balance_coef=0.0, z_coef=1e-3)
    t = tokens_for(6, 17)
    micro = [(t[i:i + 2, :-1], t[i:i + 2, 1:]) for i in (0, 2, 4)]
    model = _float64_model(n_experts)
    whole = _whole_batch(model, micro, tc)
    assert _max_grad_difference(_accumulated(model, micro, tc), whole) < 1e-12
    assert _max_grad_difference(_accumulated(model, micro, tc, _broken_accumulation), whole) > 0.5  # the test bites


def test_accumulated_balance_loss_is_the_mean_of_the_micro_batches_balance_losses():
    from models import load_balancing_loss

    tc = TrainConfig(balance_coef=0.5, z_coef=0.0)
    t = tokens_for(4, 17)
    micro = [(t[i:i + 2, :-1], t[i:i + 2, 1:]) for i in (0, 2)]
    model = _float64_model(4)
    accumulated = _accumulated(model, micro, tc)
    model.zero_grad(set_to_none=True)
    reference = 0
    for x, y in micro:
        out = model(x, return_details=True)
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        reference = reference + (ce + sum(tc.balance_coef * load_balancing_loss(r, 2) for r in out.router_logits)) / 2
    reference.backward()
    assert _max_grad_difference(accumulated, _grads(model)) < 1e-12
    assert _max_grad_difference(accumulated, _whole_batch(model, micro, tc)) > 1e-9  # not the big batch's


def _checkpointed_grads(model, x, y, tc, on):
    model.activation_checkpointing = on
    model.zero_grad(set_to_none=True)
    lm_loss(model, x, y, tc)[1].backward()
    return _grads(model)


@pytest.mark.parametrize("n_experts", [0, 4])
def test_activation_checkpointing_gives_the_same_gradients_and_saves_less(n_experts, monkeypatch):
    import models.model as model_module

    tc = TrainConfig()
    t = tokens_for(2, 33)
    x, y = t[:, :-1], t[:, 1:]
    model = _float64_model(n_experts)
    plain = _checkpointed_grads(model, x, y, tc, False)
    assert _max_grad_difference(_checkpointed_grads(model, x, y, tc, True), plain) == 0.0  # same ops, same order

    def saved_bytes(on):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        model.activation_checkpointing = on
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm_loss(model, x, y, tc)
        return total[0]

    assert saved_bytes(True) < 0.6 * saved_bytes(False)
    # a broken recomputation (block input detached: nothing flows to the layers below) is caught
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda fn, h, *a, **k: real(fn, h.detach(), *a, **k))
    broken = _checkpointed_grads(model, x, y, tc, True)
    assert broken.keys() != plain.keys() or _max_grad_difference(broken, plain) > 1e-3

import os

import torch

from models import build_model
from tests.conftest import tiny_config
from training.run_state.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint


def meta(phase, step, done=False, global_step=None):
    return {"phase": phase, "step": step, "phase_done": done, "global_step": global_step or step,
            "model_config": {k: getattr(model_cfg, k) for k in model_cfg.__dataclass_fields__}, "eval_losses": {}}


model_cfg = tiny_config(n_kv_heads=2)


def test_round_trip_is_exact_and_keeps_a_tied_head(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_cfg)
    path = save_checkpoint(str(tmp_path), model, {"optimizer": {"x": 1}}, meta("dense", 5))
    ckpt = latest_checkpoint(str(tmp_path))
    assert ckpt.path == path and ckpt.meta["step"] == 5 and ckpt.load_state()["optimizer"] == {"x": 1}
    loaded = ckpt.load_model()
    assert loaded.lm_head.weight is loaded.embed.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]


def test_corrupted_newest_checkpoint_is_reported_and_skipped(tmp_path):
    model = build_model(model_cfg)
    save_checkpoint(str(tmp_path), model, {}, meta("dense", 5))
    newest = save_checkpoint(str(tmp_path), model, {}, meta("dense", 10))
    with open(os.path.join(newest, "state.pt"), "ab") as f:
        f.write(b"x")
    messages = []
    ckpt = latest_checkpoint(str(tmp_path), log=messages.append)
    assert ckpt.meta["step"] == 5 and "dense-000010" in messages[0] and "corrupted" in messages[0]


def test_truncated_checkpoint_without_meta_is_ignored(tmp_path):
    model = build_model(model_cfg)
    save_checkpoint(str(tmp_path), model, {}, meta("dense", 5))
    os.makedirs(tmp_path / "checkpoints" / "dense-000010")  # a directory left half-made by hand
    assert latest_checkpoint(str(tmp_path), log=lambda _: None).meta["step"] == 5


def test_pruning_keeps_phase_ends_and_the_newest_periodic(tmp_path):
    model = build_model(model_cfg)
    for step in (5, 10, 15):
        save_checkpoint(str(tmp_path), model, {}, meta("dense", step))
    save_checkpoint(str(tmp_path), model, {}, meta("dense", 20, done=True))
    for step in (5, 10, 15):
        save_checkpoint(str(tmp_path), model, {}, meta("moe", step, global_step=20 + step))
    names = [os.path.basename(c.path) for c in list_checkpoints(str(tmp_path / "checkpoints"))]
    assert names == ["dense-000020", "moe-000010", "moe-000015"]
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "moe-000015"

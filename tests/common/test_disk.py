"""Disk: a failed write at every write site is one line (WriteFailed) naming the file, the cause and the space,
leaves no temporary behind and keeps the previous file; on a real 3 MiB tmpfs the disk fills up for real; the
size estimates match what is really written."""
import builtins
import errno
import fnmatch
import io
import os
import subprocess

import pytest
import torch
from safetensors import SafetensorError

import export_hf as export_cli
import training.run_state.checkpoint as checkpoint_module
from data.synthetic import generate_stories
from data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from data.tokens import cache_bytes, tokenize_to_cache
from models import build_model
from tests.conftest import tiny_config
from common.files import write_atomic
from training.run_state.checkpoint import latest_checkpoint, save_checkpoint
from common.files import NotEnoughSpace, WriteFailed, check_free_space, dir_bytes, free_bytes, guarded_write
from common.formats import human
from training.run_state.disk import checkpoint_bytes, peak_checkpoint_bytes, remove_stale_temporaries
from training.stages import PIPELINE
from training.reporting.metrics import MetricsLog, plot_losses
from transfer.hf_format import export_hf

MODEL_CFG = tiny_config()
FAULTS = {  # what the OS says when a disk fills, fails, or has its permissions changed under a running job
    "ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "EIO": lambda: OSError(errno.EIO, "Input/output error"),
    "EACCES": lambda: PermissionError(errno.EACCES, "Permission denied"),
}


def meta(step: int, phase: str = "dense") -> dict:
    return {"phase": phase, "step": step, "phase_done": False, "global_step": step,
            "model_config": {k: getattr(MODEL_CFG, k) for k in MODEL_CFG.__dataclass_fields__}, "eval_losses": {}}


def trained_state(model) -> dict:
    """What the pipeline saves: AdamW's state after a step (two moments per weight) and the RNG state."""
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, model.config.vocab_size, (1, 8))).float().pow(2).mean().backward()
    opt.step()
    return {"optimizer": opt.state_dict(), "rng": torch.get_rng_state()}


def leftovers(root) -> list[str]:
    """Temporaries or set-aside copies anywhere under root."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if ".tmp" in n or ".old-" in n]


def assert_one_clear_line(e: WriteFailed, path: str, cause: str) -> None:
    text = str(e)
    assert "\n" not in text and path in text and cause in text and "free there" in text, text
    assert e.path == path and e.free > 0


# --------------------------------------------------------------------------------------- fault injection
class _FailingFile:
    """A real open file whose write() stores half the data, then raises: a disk failing mid-write."""

    def __init__(self, f, fault: Exception):
        self._f, self._fault = f, fault

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise self._fault

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def fail_writes(monkeypatch, pattern: str, fault: Exception) -> None:
    """Writes through open()/os.fdopen() to a file whose name matches pattern raise fault half-way."""
    real_open = io.open

    def failing_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        writing = any(c in mode for c in "wax+")
        return _FailingFile(f, fault) if writing and fnmatch.fnmatch(os.path.basename(name), pattern) else f

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(io, "open", failing_open)  # os.fdopen's open


def rust_error(fault: OSError) -> SafetensorError:
    """How safetensors (Rust) reports the same OS error."""
    return SafetensorError(f"Error while serializing: I/O error: {fault.strerror} (os error {fault.errno})")


def fail_rust_writes(monkeypatch, target, attribute: str, fault: OSError) -> None:
    """target.attribute (a safetensors writer) writes half a file, then raises fault as Rust does."""
    def failing(obj, filename, *args, **kwargs):
        with io.open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise rust_error(fault)

    monkeypatch.setattr(target, attribute, failing)


# ------------------------------------------------------------------------------- the write sites, each
@pytest.fixture(scope="module")
def tokenizers():
    stories = generate_stories(200, seed=0)
    return train_tokenizer(stories[:100], 400), train_tokenizer(stories, 600)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("failing", ["model.safetensors", "state.pt", "meta.json"])
def test_checkpoint_write_fails_cleanly_and_keeps_the_previous_one(tmp_path, monkeypatch, fault, failing):
    torch.manual_seed(0)
    model = build_model(MODEL_CFG)
    save_checkpoint(str(tmp_path), model, trained_state(model), meta(5))
    if failing == "model.safetensors":
        fail_rust_writes(monkeypatch, checkpoint_module, "save_model", FAULTS[fault]())
    else:
        fail_writes(monkeypatch, failing, FAULTS[fault]())
    target = str(tmp_path / "checkpoints" / "dense-000010")
    with pytest.raises(WriteFailed) as e:
        save_checkpoint(str(tmp_path), model, trained_state(model), meta(10))
    monkeypatch.undo()
    assert_one_clear_line(e.value, target, fault)
    assert e.value.needed == pytest.approx(checkpoint_bytes(model), rel=0.1)
    assert not leftovers(tmp_path) and not os.path.exists(target)
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "dense-000005"
    previous = latest_checkpoint(str(tmp_path))
    assert previous.meta["step"] == 5 and previous.load_model() is not None


def test_torch_save_short_write_is_reported_with_the_numbers(tmp_path, monkeypatch):
    """torch.save given a path loses the errno ('unexpected pos'): the message still names file, cause, space."""
    model = build_model(MODEL_CFG)
    save_checkpoint(str(tmp_path), model, trained_state(model), meta(5))

    def short_write(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(WriteFailed) as e:
        save_checkpoint(str(tmp_path), model, trained_state(model), meta(10))
    monkeypatch.undo()
    assert_one_clear_line(e.value, str(tmp_path / "checkpoints" / "dense-000010"), "unexpected pos 576 vs 534")
    assert not leftovers(tmp_path) and latest_checkpoint(str(tmp_path)).meta["step"] == 5


def test_the_same_step_saved_again_keeps_the_older_copy_if_the_rename_fails(tmp_path, monkeypatch):
    """A resumed run saves a step that exists: the older copy is set aside, and restored when the save fails."""
    torch.manual_seed(0)
    model = build_model(MODEL_CFG)
    path = save_checkpoint(str(tmp_path), model, trained_state(model), meta(5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(src).startswith(".tmp-") and dst == path:
            raise FAULTS["EIO"]()
        return real_replace(src, dst)

    with torch.no_grad():
        model.embed.weight.add_(1.0)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(WriteFailed):
        save_checkpoint(str(tmp_path), model, trained_state(model), meta(5))
    monkeypatch.undo()
    assert not leftovers(tmp_path)
    kept = latest_checkpoint(str(tmp_path)).load_model()
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("fault", FAULTS)
def test_text_file_write_fails_cleanly(tmp_path, monkeypatch, fault):
    path = str(tmp_path / "settings.json")
    write_atomic(path, "old")
    fail_writes(monkeypatch, ".tmp-*", FAULTS[fault]())
    with pytest.raises(WriteFailed) as e:
        write_atomic(path, "new" * 1000)
    monkeypatch.undo()
    assert_one_clear_line(e.value, path, fault)
    assert e.value.needed == 3000 and open(path).read() == "old" and not leftovers(tmp_path)


@pytest.mark.parametrize("fault", FAULTS)
def test_metrics_append_fails_cleanly_and_keeps_the_earlier_records(tmp_path, monkeypatch, fault):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for step in range(3):
        log.write(phase="dense", kind="train", global_step=step, loss=1.0)
    before = open(path, "rb").read()
    fail_writes(monkeypatch, "metrics.jsonl", FAULTS[fault]())
    with pytest.raises(WriteFailed) as e:
        log.write(phase="dense", kind="train", global_step=3, loss=1.0, note="x" * 100)
    monkeypatch.undo()
    assert_one_clear_line(e.value, path, fault)
    assert open(path, "rb").read() == before and len(log.records()) == 3  # not even half a line is left


def loss_records(n: int) -> list[dict]:
    return [dict(phase="dense", kind="train", global_step=s, loss=3.0 - s / n) for s in range(n)]


@pytest.mark.parametrize("fault", FAULTS)
def test_loss_curve_write_fails_cleanly_and_keeps_the_previous_picture(tmp_path, monkeypatch, fault):
    path = str(tmp_path / "loss_curve.png")
    plot_losses(loss_records(5), path, PIPELINE)
    before = open(path, "rb").read()
    fail_writes(monkeypatch, "loss_curve.png.tmp*", FAULTS[fault]())
    with pytest.raises(WriteFailed) as e:
        plot_losses(loss_records(50), path, PIPELINE)
    monkeypatch.undo()
    assert_one_clear_line(e.value, path, fault)
    assert open(path, "rb").read() == before and not leftovers(tmp_path)


@pytest.mark.parametrize("fault", FAULTS)
def test_tokenizer_save_fails_cleanly_and_keeps_the_previous_tokenizer(tmp_path, monkeypatch, tokenizers, fault):
    old, new = tokenizers
    directory = str(tmp_path / "tokenizer")
    save_tokenizer(old, directory)
    fail_writes(monkeypatch, "tokenizer_config.json", FAULTS[fault]())
    with pytest.raises(WriteFailed) as e:
        save_tokenizer(new, directory)
    monkeypatch.undo()
    assert_one_clear_line(e.value, directory, fault)
    assert len(load_tokenizer(directory)) == len(old) and not leftovers(tmp_path)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("failing", ["tokens-*.bin.tmp-*", ".tmp-*"])  # the .bin, then its .json (write_atomic)
def test_token_cache_write_fails_cleanly_and_keeps_the_other_caches(tmp_path, monkeypatch, tokenizers, fault,
                                                                     failing):
    tok = tokenizers[0]
    stories = generate_stories(40, seed=1)
    tokenize_to_cache(stories[:20], tok, str(tmp_path))
    before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)}
    fail_writes(monkeypatch, failing, FAULTS[fault]())
    with pytest.raises(WriteFailed) as e:
        tokenize_to_cache(stories, tok, str(tmp_path))
    monkeypatch.undo()
    assert "\n" not in str(e.value) and fault in str(e.value) and "tokens-" in e.value.path
    assert {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)} == before  # no orphan .bin either
    assert len(tokenize_to_cache(stories, tok, str(tmp_path))) > 0  # and the next try writes it


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("failing", ["model.safetensors", "config.json"])
def test_export_fails_cleanly_and_leaves_no_partial_export(tmp_path, monkeypatch, fault, failing):
    import transformers.modeling_utils

    model = build_model(MODEL_CFG)
    if failing == "model.safetensors":
        fail_rust_writes(monkeypatch, transformers.modeling_utils, "safe_save_file", FAULTS[fault]())
    else:
        fail_writes(monkeypatch, failing, FAULTS[fault]())
    out = str(tmp_path / "hf")
    with pytest.raises(WriteFailed) as e:
        export_hf(model, out)
    monkeypatch.undo()
    assert_one_clear_line(e.value, out, fault)
    assert os.listdir(tmp_path) == []  # neither the export nor its temporary


def test_export_cli_says_one_line_and_exits_1_when_a_write_fails(tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    model = build_model(MODEL_CFG)
    save_checkpoint(str(tmp_path / "run"), model, trained_state(model), meta(5))
    fail_rust_writes(monkeypatch, transformers.modeling_utils, "safe_save_file", FAULTS["EIO"]())
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # after transformers' progress bar
    assert err.startswith("error: could not write") and "EIO" in err
    assert not os.path.exists(tmp_path / "hf") and not leftovers(tmp_path)


def test_a_failure_that_is_not_a_write_passes_through_but_still_cleans_up(tmp_path):
    tmp = str(tmp_path / "x.tmp")
    with pytest.raises(KeyError):
        with guarded_write(str(tmp_path / "x")) as write:
            open(write.temporary(tmp), "w").write("partial")
            raise KeyError("a bug, not a disk problem")
    assert not os.path.exists(tmp)


# ------------------------------------------------------------------------------------- the message itself
def test_message_names_file_cause_need_free_and_fix(tmp_path):
    e = WriteFailed(str(tmp_path / "f"), "No space left on device", free=3 << 20, needed=10 << 20,
                    errno_code=errno.ENOSPC)
    assert str(e) == (f"could not write {tmp_path / 'f'}: no space left on device (ENOSPC); needed ~10.0 MiB, "
                      "3.0 MiB free there; its partial files were removed and any previous version is intact; "
                      "free 7.0 MiB or choose another output directory")
    unknown = WriteFailed("f", "Input/output error", free=1 << 30, errno_code=errno.EIO)
    assert "needed: not known in advance, 1.0 GiB free" in str(unknown) and "(EIO)" in str(unknown)
    assert human(512) == "512 B" and human(1536) == "1.5 KiB"


# ------------------------------------------------------------------------------------------- estimates
@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(n_experts=4, top_k=2), tiny_config(dim=128,
                                                                                                 n_layers=4)],
                         ids=["dense", "moe", "wider"])
def test_checkpoint_estimate_is_within_10_percent_of_the_real_size(tmp_path, cfg):
    model = build_model(cfg)
    path = save_checkpoint(str(tmp_path), model, trained_state(model), dict(meta(1), model_config=vars(cfg)))
    with torch.device("meta"):
        on_meta = build_model(cfg)
    for estimate in (checkpoint_bytes(model), checkpoint_bytes(on_meta), checkpoint_bytes(cfg)):
        assert estimate == pytest.approx(dir_bytes(path), rel=0.1)
    assert checkpoint_bytes(model.num_parameters()) == pytest.approx(dir_bytes(path), rel=0.1)


def test_peak_checkpoint_estimate_bounds_what_the_directory_really_holds(tmp_path, monkeypatch):
    """Stages of growing size, periodic saves and pruning: the most the directory held is the estimate."""
    real_prune, peak = checkpoint_module._prune, [0]

    def measuring_prune(root, keep):  # the high-water mark: the new checkpoint written, the old not yet pruned
        peak[0] = max(peak[0], dir_bytes(root))
        real_prune(root, keep)

    monkeypatch.setattr(checkpoint_module, "_prune", measuring_prune)
    cfgs, sizes, global_step = [tiny_config(), tiny_config(n_experts=4, top_k=2), tiny_config(dim=64)], [], 0
    for cfg, phase in zip(cfgs, ("dense", "moe", "grown")):
        model = build_model(cfg)
        state = trained_state(model)
        sizes.append(checkpoint_bytes(model))
        for step in range(1, 6):
            global_step += 1
            save_checkpoint(str(tmp_path), model, state, dict(meta(step, phase), global_step=global_step,
                                                              phase_done=step == 5, model_config=vars(cfg)))
    assert peak_checkpoint_bytes(sizes, keep_periodic=2) == pytest.approx(peak[0], rel=0.1)


def test_token_cache_estimate_is_within_10_percent_of_the_real_cache(tmp_path, tokenizers):
    stories = generate_stories(2000, seed=3)
    for i, tok in enumerate(tokenizers):
        real = 2 * len(tokenize_to_cache(stories, tok, str(tmp_path / str(i))))
        assert cache_bytes(stories, tok) == pytest.approx(real, rel=0.1)
        assert cache_bytes(stories) >= real  # the bound without a tokenizer: one token per byte at most


def test_check_free_space_says_what_is_needed_and_what_is_free(tmp_path):
    free = free_bytes(str(tmp_path))
    assert check_free_space(str(tmp_path / "run"), {"checkpoints": 1000}) == free
    with pytest.raises(NotEnoughSpace) as e:
        check_free_space(str(tmp_path / "run"), {"checkpoints": free, "token cache": 2 << 20})
    text = str(e.value)
    assert "\n" not in text and "checkpoints" in text and "token cache 2.0 MiB" in text and human(free) in text
    assert "another --out-dir" in text
    check_free_space(str(tmp_path), {"checkpoints": free}, already_on_disk=free)  # a resumed run's own files


def test_stale_temporaries_of_a_killed_run_are_removed_and_set_aside_copies_restored(tmp_path):
    model = build_model(MODEL_CFG)
    save_checkpoint(str(tmp_path), model, trained_state(model), meta(5))
    save_checkpoint(str(tmp_path), model, trained_state(model), meta(10))
    ckpts = tmp_path / "checkpoints"
    os.replace(ckpts / "dense-000010", ckpts / ".old-dense-000010-4242")  # killed between set-aside and rename
    (ckpts / ".tmp-abc").mkdir()
    (ckpts / ".tmp-abc" / "model.safetensors").write_bytes(b"\0" * 5000)
    for name in (".tmp-x1", "tokenizer.tmp-4242/tokenizer.json", "cache/tokens-ab.bin.tmp-4242",
                 "loss_curve.png.tmp-4242.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\0" * 1000)
    notes = []
    assert remove_stale_temporaries(str(tmp_path), log=notes.append) == 9000
    assert not leftovers(tmp_path) and latest_checkpoint(str(tmp_path)).meta["step"] == 10
    assert any("restored" in n and "dense-000010" in n for n in notes) and any("8.8 KiB" in n for n in notes)


# ---------------------------------------------------------------------------------- a real, small disk
@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB tmpfs (needs root); skipped, with the reason, where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: the real-disk tests need `mount -t tmpfs` (as root)")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 3 MiB tmpfs ({r.stderr.strip() or r.returncode}); run the tests as root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int) -> None:
    """Write a ballast file so that about `leave` bytes stay free."""
    with open(disk / "ballast", "wb") as f:
        f.write(b"\0" * max(0, free_bytes(str(disk)) - leave))


def test_real_disk_full_checkpoint_fails_cleanly_and_the_previous_one_loads(small_disk):
    torch.manual_seed(0)
    small, large = build_model(MODEL_CFG), build_model(tiny_config(dim=128, n_layers=4))
    save_checkpoint(str(small_disk), small, trained_state(small), meta(5))
    free_before = free_bytes(str(small_disk))
    assert checkpoint_bytes(large) > free_before  # the test's premise: the second checkpoint cannot fit
    with pytest.raises(WriteFailed) as e:
        save_checkpoint(str(small_disk), large, trained_state(large), meta(10))
    assert_one_clear_line(e.value, str(small_disk / "checkpoints" / "dense-000010"), "ENOSPC")
    assert e.value.needed > e.value.free and e.value.free == free_before  # the partial files' space came back
    assert not leftovers(small_disk) and (small_disk / "checkpoints" / "LATEST").read_text() == "dense-000005"
    loaded = latest_checkpoint(str(small_disk)).load_model()
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), loaded.state_dict().values()))


def test_real_disk_full_at_every_other_write_site(small_disk, tokenizers):
    """Each site, with its previous version on disk, then the disk filled until its next write cannot fit."""
    tok = tokenizers[0]
    plot = str(small_disk / "loss_curve.png")
    sites = {
        "text": (lambda: write_atomic(str(small_disk / "settings.json"), "x" * 20000),
                 str(small_disk / "settings.json")),
        "metrics": (lambda: MetricsLog(str(small_disk / "metrics.jsonl")).write(note="x" * 20000),
                    str(small_disk / "metrics.jsonl")),
        "plot": (lambda: plot_losses(loss_records(500), plot, PIPELINE), plot),
        "tokenizer": (lambda: save_tokenizer(tokenizers[1], str(small_disk / "tokenizer")),
                      str(small_disk / "tokenizer")),
        "token cache": (lambda: tokenize_to_cache(generate_stories(300, seed=2), tok, str(small_disk / "cache")),
                        None),
        "export": (lambda: export_hf(build_model(tiny_config(dim=128, n_layers=4)), str(small_disk / "hf")),
                   str(small_disk / "hf")),
    }
    write_atomic(str(small_disk / "settings.json"), "old")
    plot_losses(loss_records(5), plot, PIPELINE)
    save_tokenizer(tok, str(small_disk / "tokenizer"))
    kept = {p: open(p, "rb").read() for p in (str(small_disk / "settings.json"), plot)}
    fill(small_disk, leave=8192)
    for name, (write, path) in sites.items():
        with pytest.raises(WriteFailed) as e:
            write()
        assert "ENOSPC" in str(e.value) and "\n" not in str(e.value), name
        assert path is None or e.value.path == path, name
        assert not leftovers(small_disk), name
    assert {p: open(p, "rb").read() for p in kept} == kept
    assert len(load_tokenizer(str(small_disk / "tokenizer"))) == len(tok)
    assert not os.path.exists(small_disk / "hf")


def test_real_disk_turned_read_only_mid_run(small_disk):
    """The 'permission change mid-run': the file system is remounted read-only between two checkpoints."""
    model = build_model(MODEL_CFG)
    save_checkpoint(str(small_disk), model, trained_state(model), meta(5))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(WriteFailed) as e:
        save_checkpoint(str(small_disk), model, trained_state(model), meta(10))
    assert_one_clear_line(e.value, str(small_disk / "checkpoints" / "dense-000010"), "EROFS")
    assert "remount it read-write" in str(e.value)
    assert latest_checkpoint(str(small_disk)).meta["step"] == 5

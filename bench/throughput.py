"""Training-step throughput of the project's models against transformers' Llama / Mixtral, and MoE layer cost.

    python bench/throughput.py                       # CPU here, fp32; CUDA (bf16 autocast) when available
    python bench/throughput.py --precision=bf16 --compile --experts 8

Same configs, same weights (exported with transfer.hf_format.to_hf), same batches, the same autocast dtype on
both sides, one process, contenders alternated step by step after warm-up; medians. transformers' Mixtral runs
at its fastest experts implementation: every one it offers here (set_experts_implementation: eager, batched_mm,
grouped_mm, ...) races and the fastest is the one compared. --compile compiles both sides' models. Model FLOPs =
6 x active parameters x tokens (+ attention 12 x layers x T x dim per token); utilisation against the matmul
peak in the step's dtype measured in the same run. Figures, not assertions: run it on a quiet machine. Writes
throughput.json and throughput.png to --out-dir (default bench/results).
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataclasses import replace  # noqa: E402

from config import ConfigError  # noqa: E402
from models import FeedForward, MoEFeedForward, build_model  # noqa: E402
from training.loop import lm_loss, make_optimizer  # noqa: E402
from training.settings import build_settings, make_parser, merge_overrides, parse_command_line  # noqa: E402
from transfer.hf_format import to_hf  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=2048, reps=10) -> float:
    """GFLOP/s of an n x n matmul, best of reps."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def step_fn(model, hf: bool, device, autocast_dtype, tc, net=None):
    """One training step of `net` (model, or its compiled wrapper): the project's objective (training.loop.lm_loss:
    cross-entropy + MoE balance and z losses) for our models; cross-entropy + Mixtral's own load-balancing loss
    for HF's (as its trainer does); the pipeline's AdamW for both."""
    opt = make_optimizer(model, 1e-4, tc)  # the pipeline's optimizer for both contenders
    hf_moe = hf and getattr(model.config, "num_local_experts", 0) > 0
    net = model if net is None else net

    def step(x, y):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if hf:
                out = net(x, output_router_logits=True) if hf_moe else net(x)
                loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
                if hf_moe:
                    loss = loss + tc.balance_coef * out.aux_loss
            else:
                loss = lm_loss(net, x, y, tc)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_contenders(ours, device, autocast_dtype, tc, compiled: bool, batch) -> dict:
    """transformers' model of `ours` at each experts implementation that runs a training step here (a dense
    Llama has one); an implementation it accepts but cannot run (a CUDA kernel's package missing, out of memory)
    is left out, and so is one whose trial step took over TRIAL_SLOWER times the fastest trial's (batched_mm
    gathers every token's expert weights: minutes a step at these shapes)."""
    base = to_hf(ours).to(device).train()
    impls = HF_EXPERTS if getattr(base.config, "num_local_experts", 0) > 0 else [None]
    out, trial = {}, {}
    for impl in impls:
        gathered = _batched_mm_bytes(ours.config, batch[0].numel(), autocast_dtype)
        if impl == "batched_mm" and gathered > BATCHED_MM_LIMIT:
            print(f"transformers experts implementation batched_mm: left out (it would gather "
                  f"{gathered / 2**30:.0f} GiB of per-token expert weights)")
            continue
        hf = copy.deepcopy(base)
        try:
            if impl is not None:
                hf.set_experts_implementation(impl)
            step = step_fn(hf, True, device, autocast_dtype, tc, torch.compile(hf) if compiled else hf)
            for _ in range(2):  # the second trial step is timed: the first compiles or warms up
                sync(device)
                started = time.perf_counter()
                step(*batch)
                sync(device)
        except (ValueError, ImportError, RuntimeError, NotImplementedError) as e:
            print(f"transformers experts implementation {impl}: left out ({type(e).__name__}: {str(e)[:120]})")
            del hf
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        name = f"hf {impl}" if impl else "hf"
        out[name], trial[name] = step, time.perf_counter() - started
        if min(trial.values()) * TRIAL_SLOWER < trial[name]:
            print(f"transformers experts implementation {impl}: left out (trial step {trial[name]:.2f} s, over "
                  f"{TRIAL_SLOWER}x the fastest's {min(trial.values()):.2f} s)")
            del out[name]
    return {k: v for k, v in out.items() if trial[k] <= TRIAL_SLOWER * min(trial.values())}


def _batched_mm_bytes(cfg, tokens: int, autocast_dtype) -> int:
    """Bytes of expert weights transformers' batched_mm gathers: one gate/up/down copy per token and choice."""
    return tokens * cfg.top_k * 3 * cfg.dim * cfg.hidden_dim * (2 if autocast_dtype else 4)


def race(contenders: dict, batch, reps: int, device) -> dict[str, float]:
    """Median seconds per step, contenders alternated every step after 3 warm-up steps each."""
    times = {k: [] for k in contenders}
    for i in range(reps + 3):
        for name, step in contenders.items():
            sync(device)
            t = time.perf_counter()
            step(*batch)
            sync(device)
            if i >= 3:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def moe_layer_costs(dim: int, ffn: int, tokens: int, device, reps: int) -> list[tuple]:
    """ms per forward+backward of an MoE layer (top-2) vs a dense SwiGLU with the same active parameters."""
    rows = []
    for n_experts in (4, 8, 16):
        moe = MoEFeedForward(dim, ffn, n_experts, 2).to(device)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        dense = FeedForward(dim, 2 * ffn).to(device)
        x = torch.randn(tokens, dim, device=device, requires_grad=True)

        def run(layer):
            def go(_x, _y):
                out = layer(x)[0]
                out.square().mean().backward()
            return go

        t = race({"moe": run(moe), "dense": run(dense)}, (None, None), reps, device)
        rows.append((n_experts, 1000 * t["moe"], 1000 * t["dense"]))
    return rows


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = result["steps"]
    names = [f"{r['model']}\n{r['contender']}" for r in rows]
    bars = a1.bar(names, [r["ms"] for r in rows], color=["C0" if r["contender"] == "project" else "C7" for r in rows])
    for b, r in zip(bars, rows):
        a1.annotate(f"MFU {r['mfu']:.0%}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    a1.set_ylabel("ms per training step")
    a1.set_title(f"Training step, {result['config']}", fontsize=9)
    layers = result["moe_layer"]
    if not layers:  # --skip-layer
        a2.set_visible(False)
        layers = [{"experts": 0, "moe_ms": 1.0, "dense_ms": 1.0}]
    xs = [str(r["experts"]) for r in layers]
    a2.plot(xs, [r["moe_ms"] for r in layers], "o-", label="MoE layer (top-2)")
    a2.plot(xs, [r["dense_ms"] for r in layers], "s--", label="dense SwiGLU, same active parameters")
    a2.set_ylim(0, 1.3 * max(r["moe_ms"] for r in layers))
    a2.set_xlabel("experts")
    a2.set_ylabel("ms, forward + backward")
    a2.set_title("MoE layer cost against a dense FFN", fontsize=9)
    a2.legend(fontsize=8)
    fig.suptitle(f"{result['device']}, {result['threads']} thread(s), matmul peak {result['peak_gflops']:.0f} GFLOP/s",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


HF_EXPERTS = ("eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe")  # those missing here are skipped
BATCHED_MM_LIMIT = 2 << 30  # bytes: above this batched_mm is not tried (it ran this machine out of memory)
TRIAL_SLOWER = 3  # an implementation whose trial step is this many times the fastest's does not race
BENCH_DEFAULTS = {"train": {"batch_size": 8}, "model": {"tie_embeddings": False}}  # on top of config.py's


def main(argv: list[str]) -> int:
    p = make_parser(__doc__.split("\n")[0], epilog="Model and batch: the settings below (config.py's defaults, "
                    "batch_size 8, untied embeddings), e.g. --dim=512 --n_heads=8 --batch_size=16 --seq_len=512")
    p.add_argument("--reps", type=int, default=8, help="timed steps per contender (medians)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out-dir", default=os.path.join("bench", "results"))
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16], help="MoE step races at these expert counts")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast dtype of both sides (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides' models")
    p.add_argument("--skip-layer", action="store_true", help="skip the MoE layer vs dense FFN table")
    try:
        a, overrides = parse_command_line(p, argv)
        s = build_settings(None, merge_overrides(BENCH_DEFAULTS, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, batch_size, seq = s.model, s.train.batch_size, s.train.seq_len
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = a.precision == "bf16" or (a.precision == "auto" and device.type == "cuda")
    ac = torch.bfloat16 if bf16 else None
    peak = matmul_peak(device, ac or torch.float32, n=8192 if device.type == "cuda" else 2048)  # big enough to saturate
    dtype_name = "bf16" if ac else "fp32"
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matmul peak {peak:.1f} GFLOP/s ({dtype_name}); {'compiled' if a.compile else 'eager'}")
    result = dict(device=f"{device.type} ({dtype_name})", torch=torch.__version__, precision=dtype_name,
                  compile=a.compile, threads=torch.get_num_threads(), peak_gflops=peak, steps=[], moe_layer=[],
                  speedup={}, hf_experts={}, hf_all={},
                  config=f"dim {m.dim}, {m.n_layers} layers, vocab {m.vocab_size}, batch {batch_size}x{seq}")
    x = torch.randint(0, m.vocab_size, (batch_size, seq + 1), device=device)
    batch = (x[:, :-1], x[:, 1:])
    tokens = batch_size * seq
    for kind, n_experts in [("dense", 0)] + [(f"MoE-{e}", e) for e in a.experts]:
        cfg = replace(m, max_seq_len=seq, n_experts=n_experts, top_k=s.growth.top_k)
        torch.manual_seed(0)
        ours = build_model(cfg).to(device)
        contenders = {"ours": step_fn(ours, False, device, ac, s.train, torch.compile(ours) if a.compile else None)}
        contenders.update(hf_contenders(ours, device, ac, s.train, a.compile, batch))
        times = race(contenders, batch, a.reps, device)
        fastest = min((k for k in times if k != "ours"), key=times.get)
        result["hf_all"][kind] = {k: 1000 * v for k, v in times.items() if k != "ours"}
        result["hf_experts"][kind] = fastest.removeprefix("hf").strip() or None
        flops = ours.flops_per_token(seq) * tokens
        for name in ("ours", fastest):
            sec = times[name]
            label = "project" if name == "ours" else ("HF Llama" if n_experts == 0 else "HF Mixtral")
            print(f"{kind:<6} {label:<11} {1000 * sec:8.1f} ms/step  {tokens / sec:9.0f} tok/s  "
                  f"{flops / sec / 1e9:6.1f} GFLOP/s  MFU {100 * flops / sec / 1e9 / peak:5.1f}%"
                  + (f"  (experts {result['hf_experts'][kind]}, fastest of "
                     + ", ".join(f"{k.split()[1]} {1000 * v:.0f} ms" for k, v in times.items() if k != "ours") + ")"
                     if name != "ours" and n_experts else ""))
            result["steps"].append(dict(model=kind, contender=label, ms=1000 * sec, tokens_per_s=tokens / sec,
                                        mfu=flops / sec / 1e9 / peak))
        print(f"{kind:<6} speed-up project / HF: {times[fastest] / times['ours']:.2f}x")
        result["speedup"][kind] = times[fastest] / times["ours"]
    os.makedirs(a.out_dir, exist_ok=True)
    if a.skip_layer:
        return _write(result, a.out_dir)
    print("\nMoE layer (top-2) vs dense SwiGLU with the same active parameters, forward+backward, "
          f"{tokens} tokens, dim {m.dim}:")
    for n_experts, moe_ms, dense_ms in moe_layer_costs(m.dim, m.hidden_dim, tokens, device, a.reps):
        print(f"  {n_experts:>2} experts: {moe_ms:7.2f} ms vs dense {dense_ms:7.2f} ms  ({100 * (moe_ms / dense_ms - 1):+.0f}%)")
        result["moe_layer"].append(dict(experts=n_experts, moe_ms=moe_ms, dense_ms=dense_ms))
    return _write(result, a.out_dir)


def _write(result: dict, out_dir: str) -> int:
    """throughput.json and throughput.png into out_dir."""
    with open(os.path.join(out_dir, "throughput.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out_dir, "throughput.png"))
    print(f"wrote {out_dir}/throughput.json and throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

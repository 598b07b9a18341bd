"""Training-step throughput of the project's models against transformers' Llama / Mixtral, and MoE layer cost.

    python bench/throughput.py                  # CPU here; CUDA (bf16 autocast) when available
    python bench/throughput.py --reps=10 --dim=256

Same configs, same weights (exported with transfer.hf_format.to_hf), same batches, one process, contenders
alternated step by step after warm-up; medians. Model FLOPs = 6 x active parameters x tokens (+ attention
12 x layers x T x dim per token); utilisation against the fp32 (CPU) / bf16 (CUDA) matmul peak measured in
the same run. Figures, not assertions: run it on a quiet machine. Writes throughput.json and throughput.png
to --out-dir (default bench/results).
"""
from __future__ import annotations

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


def step_fn(model, hf: bool, device, autocast_dtype, tc):
    """One training step: the project's objective (training.loop.lm_loss: cross-entropy + MoE balance and z
    losses) for our models; cross-entropy + Mixtral's own load-balancing loss for HF's (as its trainer does);
    the pipeline's AdamW for both."""
    opt = make_optimizer(model, 1e-4, tc)  # the pipeline's optimizer for both contenders
    hf_moe = hf and getattr(model.config, "num_local_experts", 0) > 0

    def step(x, y):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if hf:
                out = model(x, output_router_logits=True) if hf_moe else model(x)
                loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
                if hf_moe:
                    loss = loss + tc.balance_coef * out.aux_loss
            else:
                loss = lm_loss(model, x, y, tc)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


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


BENCH_DEFAULTS = {"train": {"batch_size": 8}, "model": {"tie_embeddings": False}}  # on top of config.py's


def main(argv: list[str]) -> int:
    p = make_parser(__doc__.split("\n")[0], epilog="Model and batch: the settings below (config.py's defaults, "
                    "batch_size 8, untied embeddings), e.g. --dim=512 --n_heads=8 --batch_size=16 --seq_len=512")
    p.add_argument("--reps", type=int, default=8, help="timed steps per contender (medians)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out-dir", default=os.path.join("bench", "results"))
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16], help="MoE step races at these expert counts")
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
    ac = torch.bfloat16 if device.type == "cuda" else None
    peak = matmul_peak(device, ac or torch.float32, n=8192 if device.type == "cuda" else 2048)  # big enough to saturate
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matmul peak {peak:.1f} GFLOP/s ({'bf16' if ac else 'fp32'})")
    result = dict(device=f"{device.type} ({'bf16' if ac else 'fp32'})", torch=torch.__version__,
                  threads=torch.get_num_threads(), peak_gflops=peak, steps=[], moe_layer=[], speedup={},
                  config=f"dim {m.dim}, {m.n_layers} layers, vocab {m.vocab_size}, batch {batch_size}x{seq}")
    x = torch.randint(0, m.vocab_size, (batch_size, seq + 1), device=device)
    batch = (x[:, :-1], x[:, 1:])
    tokens = batch_size * seq
    for kind, n_experts in [("dense", 0)] + [(f"MoE-{e}", e) for e in a.experts]:
        cfg = replace(m, max_seq_len=seq, n_experts=n_experts, top_k=s.growth.top_k)
        torch.manual_seed(0)
        ours = build_model(cfg).to(device)
        hf = to_hf(ours).to(device).train()
        times = race({"ours": step_fn(ours, False, device, ac, s.train), "hf": step_fn(hf, True, device, ac, s.train)}, batch, a.reps, device)
        flops = ours.flops_per_token(seq) * tokens
        for name, sec in times.items():
            label = "project" if name == "ours" else ("HF Llama" if n_experts == 0 else "HF Mixtral")
            print(f"{kind:<6} {label:<11} {1000 * sec:8.1f} ms/step  {tokens / sec:9.0f} tok/s  "
                  f"{flops / sec / 1e9:6.1f} GFLOP/s  MFU {100 * flops / sec / 1e9 / peak:5.1f}%")
            result["steps"].append(dict(model=kind, contender=label, ms=1000 * sec, tokens_per_s=tokens / sec,
                                        mfu=flops / sec / 1e9 / peak))
        print(f"{kind:<6} speed-up project / HF: {times['hf'] / times['ours']:.2f}x")
        result["speedup"][kind] = times["hf"] / times["ours"]
    print("\nMoE layer (top-2) vs dense SwiGLU with the same active parameters, forward+backward, "
          f"{tokens} tokens, dim {m.dim}:")
    for n_experts, moe_ms, dense_ms in moe_layer_costs(m.dim, m.hidden_dim, tokens, device, a.reps):
        print(f"  {n_experts:>2} experts: {moe_ms:7.2f} ms vs dense {dense_ms:7.2f} ms  ({100 * (moe_ms / dense_ms - 1):+.0f}%)")
        result["moe_layer"].append(dict(experts=n_experts, moe_ms=moe_ms, dense_ms=dense_ms))
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "throughput.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(a.out_dir, "throughput.png"))
    print(f"wrote {a.out_dir}/throughput.json and throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

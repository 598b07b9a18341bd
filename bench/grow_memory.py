"""Peak memory and time of widening a model x2 with the five checks, for a few shapes up to SmolLM-360M's.

    OMP_NUM_THREADS=2 python bench/grow_memory.py                    # tiny and mid (a minute or two)
    OMP_NUM_THREADS=2 python bench/grow_memory.py --shapes smollm    # SmolLM-360M's shape x2 (~4 min, ~12 GiB)

Each shape runs in a child process capped at --cap-gib of address space (RLIMIT_AS), so a shape that needs more
fails there instead of taking the machine down: it builds a random fp32 model of the shape, widens it x2
(transfer.simple_growth.scale_bilaterally: heads and kv heads doubled, head_dim kept, the tied embedding untied),
and runs detailed_growth_check on --rows x --seq random token ids. Reported: the child's peak RSS (ru_maxrss), the
seconds of building, growing and checking, its CPU seconds (a measure less moved by other jobs than wall time), the
checks' verdict, and beside them the plan: the two fp32 models plus training.plan.check_estimate's peak for the
pair (the checks' own), and its time. Figures, not assertions. Writes grow_memory.json to --out-dir (default
bench/results), keeping the other shapes' last figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ModelConfig  # noqa: E402

GIB = 1024 ** 3
SHAPES = {  # the source model; each is widened x2
    "tiny": ModelConfig(vocab_size=4096, dim=64, n_layers=4, n_heads=4, max_seq_len=256),
    "mid": ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=512),
    # HuggingFaceTB/SmolLM-360M's config.json: hidden 960, 32 layers, 15 heads / 5 kv heads, intermediate 2560,
    # vocab 49152, tied embeddings, rope_theta 1e5
    "smollm": ModelConfig(vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560,
                          max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True),
}


def child(shape: str, rows: int, seq: int) -> dict:
    """Build, grow x2 and check one shape in this process; the figures as a dict."""
    import torch

    from models import build_model
    from transfer import detailed_growth_check, scale_bilaterally

    t0 = time.perf_counter()
    torch.manual_seed(0)
    old = build_model(SHAPES[shape])
    t1 = time.perf_counter()
    new = scale_bilaterally(old, 2, 0)
    t2 = time.perf_counter()
    grown_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = torch.randint(0, old.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))
    report = detailed_growth_check(old, new, tokens, verbose=False)
    t3 = time.perf_counter()
    return {"old_params": old.num_parameters(), "new_params": new.num_parameters(),
            "build_s": t1 - t0, "grow_s": t2 - t1, "checks_s": t3 - t2, "passed": report.passed,
            "failed": [k for k, r in report.results.items() if not r.passed],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "grown_peak_rss_bytes": grown_rss,
            "cpu_s": _cpu_seconds()}


def _cpu_seconds() -> float:
    """CPU seconds this process used (all threads): on a quiet 2-core machine, wall time is about half of it."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_shape(shape: str, rows: int, seq: int, cap_gib: float) -> dict:
    """The shape in a child process capped at cap_gib of address space; its figures, or why it failed."""
    cap = int(cap_gib * GIB)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", shape, "--rows", str(rows),
                           "--seq", str(seq)], capture_output=True, text=True, preexec_fn=limit)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"shape": shape, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"],
                "wall_s": wall}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(shape=shape, wall_s=wall, cap_gib=cap_gib)
    return row


def estimate(shape: str, rows: int, seq: int) -> dict:
    from dataclasses import replace

    from training.plan import check_estimate

    old = SHAPES[shape]
    new = replace(old, dim=2 * old.dim, n_heads=2 * old.n_heads,
                  n_kv_heads=None if old.n_kv_heads is None else 2 * old.n_kv_heads,
                  ffn_dim=2 * old.hidden_dim, tie_embeddings=False)
    from training.costs import parameter_count

    e = check_estimate(old, new, rows, seq)
    models = 4 * (parameter_count(old) + parameter_count(new))
    return {"estimate_peak_bytes": models + e.peak_bytes, "estimate_checks_bytes": e.peak_bytes,
            "estimate_seconds": e.seconds, "estimate_terms": {"fp32 models": models, **e.terms}}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,mid", help=f"comma-separated of {', '.join(SHAPES)}")
    p.add_argument("--rows", type=int, default=8, help="sequences in the checks' batch (the pipeline's 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence in the checks' batch")
    p.add_argument("--cap-gib", type=float, default=17.0, help="address-space cap of each child (RLIMIT_AS)")
    p.add_argument("--out-dir", default=os.path.join("bench", "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.rows, a.seq)))
        return
    shapes = a.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {', '.join(unknown)}: choose from {', '.join(SHAPES)}")
    load = os.getloadavg()
    print(f"widen x2 with the five checks, batch {a.rows} x {a.seq}; load average {load[0]:.2f} "
          f"(on {os.cpu_count()} cores), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'shape':>7} {'params old -> new':>22} {'peak RSS':>9} {'plan':>9} {'build':>7} {'grow':>7} "
          f"{'checks':>7} {'plan':>7} {'wall':>7} {'CPU':>7}  verdict")
    rows = []
    path = os.path.join(a.out_dir, "grow_memory.json")
    previous = json.load(open(path)).get("rows", []) if os.path.exists(path) else []
    for shape in shapes:
        row = run_shape(shape, a.rows, a.seq, a.cap_gib) | estimate(shape, a.rows, a.seq)
        row.update(load_average=load[0], rows=a.rows, seq=a.seq)
        rows.append(row)
        if "error" in row:
            print(f"{shape:>7} failed after {row['wall_s']:.0f} s: {row['error']}")
            continue
        print(f"{shape:>7} {row['old_params'] / 1e6:>8.1f}M -> {row['new_params'] / 1e6:>7.1f}M "
              f"{row['peak_rss_bytes'] / GIB:>6.2f}GiB {row['estimate_peak_bytes'] / GIB:>6.2f}GiB "
              f"{row['build_s']:>6.1f}s {row['grow_s']:>6.1f}s {row['checks_s']:>6.1f}s "
              f"{row['estimate_seconds']:>6.0f}s {row['wall_s']:>6.0f}s {row['cpu_s']:>6.0f}s  "
              f"{'passed' if row['passed'] else 'FAILED ' + ', '.join(row['failed'])}")
    kept = [r for r in previous if r.get("shape") not in shapes]  # other shapes' last figures stay
    os.makedirs(a.out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": kept + rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

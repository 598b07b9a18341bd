"""Does growth pay? The three-phase pipeline against its final architecture trained from scratch.

    python bench/growth_vs_scratch.py --data-files ../shared/data/tinystories/train.txt            # CPU scale
    python bench/growth_vs_scratch.py --scale cuda --data-files train.txt validation.txt            # GPU scale
    python bench/growth_vs_scratch.py --data-files ... --grown_lrs=6e-4,3e-4 --scratch_lrs=2e-3,3e-3 --dense_steps=600
    python bench/growth_vs_scratch.py --plot-runs bench/results/run_a bench/results/run_b --from-tflop 20

Every arm uses the same tokenizer, the same held-out stories for eval loss and the same batch stream, and
trains with the pipeline's own code (training.stages' PIPELINE; training.pipeline's load_data, transition; train_phase):
  pipeline     dense -> upcycle -> MoE -> grow (both transitions verified) -> grown MoE, once per --grown_lrs x
               --noise_stds pair (growth and phase 3 restart from the same phase-2 model and batch position);
  scratch      the grown MoE's architecture from a fresh init, once per --scratch_lrs value, for as many
               FLOPs as the pipeline spends (or --scratch_steps);
  dense_grown  (--arms) the phase-1 model grown without the MoE phase, trained to the same FLOP budget;
  small_moe    (--arms) the phase-2 MoE trained on without growth to the same FLOP budget.
Training FLOPs are counted per step as Transformer.flops_per_token x tokens (eval and checks excluded; the
checks cost about two phase-3 steps, bench/verify_cost.py). Wall time includes eval, growth and checks.
Writes results.json and growth_vs_scratch.png to --out-dir.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError  # noqa: E402
from data import check_files  # noqa: E402
from models import build_model  # noqa: E402
from training.loop import Phase, PhaseRun, train_phase  # noqa: E402
from training.pipeline import stage_phase  # noqa: E402
from training.run_data import load_data  # noqa: E402
from training.transition import transition  # noqa: E402
from training.stages import PIPELINE, Stage  # noqa: E402
from training.parallel.runtime import setup_runtime  # noqa: E402
from training.settings import (Settings, build_settings, make_parser, merge_overrides, parse_command_line,  # noqa: E402
                               place)
from transfer.simple_growth import grown_config  # noqa: E402

# Bench scales: a project preset plus overrides. The CPU scale is the cpu preset at batch 8 with evals every 25
# steps; the small phases get about 40% of the FLOPs (with ~4% growth saved nothing in a trial, FACTS.md).
SCALES = {
    "micro": ("micro", dict(dense_steps=60, moe_steps=20, grown_steps=30, eval_interval=10)),
    "cpu": ("cpu", dict(batch_size=8, dense_steps=1000, moe_steps=400, grown_steps=300, eval_interval=25,
                        eval_batches=10, warmup_steps=50)),
    "cuda": ("cuda", dict(eval_interval=100)),
}


ARMS = {"pipeline", "scratch", "dense_grown", "small_moe"}


@dataclass
class Curve:
    """Eval points of one arm: cumulative training FLOPs, wall seconds since the arm began, eval loss."""

    name: str
    flops: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    phase_starts: list[float] = field(default_factory=list)  # FLOPs at which a grown phase begins
    lr: dict = field(default_factory=dict)
    elapsed: float = 0.0  # wall seconds spent so far, growth and checks included


class Recorder:
    """The MetricsLog interface train_phase writes to: turns eval records into curve points."""

    def __init__(self, curve: Curve, flops_per_step: float, flops_before: float):
        self.curve, self.per_step, self.before = curve, flops_per_step, flops_before
        self.t0 = time.perf_counter() - curve.elapsed

    def write(self, **r) -> None:
        if r["kind"] == "eval":
            self.curve.flops.append(self.before + r["step"] * self.per_step)
            self.curve.wall.append(time.perf_counter() - self.t0)
            self.curve.loss.append(r["loss"])

    def wall(self) -> float:
        return time.perf_counter() - self.t0


def flops_per_step(model, tc) -> float:
    return model.flops_per_token(tc.seq_len) * tc.batch_size * tc.seq_len


def steps_to_budget(model, tc, curve: Curve, budget: float) -> int:
    """Steps of model that bring curve's training FLOPs to budget."""
    return max(1, round((budget - (curve.flops[-1] if curve.flops else 0.0)) / flops_per_step(model, tc)))


def timed(curve: Curve, fn):
    """fn() with its wall time added to curve's clock (growth and checks: wall time, no training FLOPs)."""
    t = time.perf_counter()
    out = fn()
    curve.elapsed += time.perf_counter() - t
    return out


def branch(base: Curve, name: str, lr: dict) -> Curve:
    """A new curve that shares base's points so far."""
    return replace(base, name=name, flops=list(base.flops), wall=list(base.wall), loss=list(base.loss),
                   phase_starts=list(base.phase_starts), lr=lr)


def run_phase(model, phase: Phase, s: Settings, rt, data, curve: Curve) -> None:
    """Train one phase, appending its eval points to curve (continuing its FLOP and wall counters)."""
    per_step = flops_per_step(model, s.train)
    before = curve.flops[-1] if curve.flops else 0.0
    rec = Recorder(curve, per_step, before)
    run = PhaseRun(rt, s.train, data.batches, data.val_batches, rec)
    print(f"[{curve.name}] {phase.name}: {phase.steps} steps at lr {phase.lr:g}, "
          f"{per_step / 1e9:.1f} GFLOP/step, {model.num_parameters():,} parameters")
    train_phase(model, phase, run)
    curve.elapsed = rec.wall()
    print(f"[{curve.name}] {phase.name} done: eval loss {curve.loss[-1]:.4f} at {curve.flops[-1] / 1e12:.2f} TFLOP, "
          f"{curve.wall[-1]:.0f} s")


def grown_phase(curve: Curve, grow, s: Settings, rt, data, lr: float, steps: int | None = None,
                budget: float = 0.0):
    """Grow (timed), then train the grown model as the last stage for steps, or (steps None) up to budget FLOPs."""
    model = timed(curve, grow)
    curve.phase_starts.append(curve.flops[-1])
    steps = steps or steps_to_budget(model, s.train, curve, budget)
    run_phase(model, replace(stage_phase(PIPELINE[-1], s, last=True), steps=steps, lr=lr), s, rt, data, curve)


def grow_verified(stage: Stage, model, data, s: Settings, rt):
    """The stage's transition, as in the pipeline; a failed check ends the benchmark."""
    result = transition(stage, model, data, s, rt)
    if not result.passed:
        raise SystemExit(f"the transition into {stage.name} failed its checks; see above")
    return result.model


def pipeline_arms(s: Settings, rt, data, variants: list[tuple[float, float]], arms: set[str]) -> list[Curve]:
    """The stages before the last once, the last stage's growth + training once per (LR, noise_std) variant;
    optionally (arms) the first stage's model grown straight into the last stage's (dense_grown, first variant)
    and the last-but-one stage's model trained on without growth (small_moe), both to the same FLOPs."""
    tc, start = s.train, data.batches.state_dict()
    *small, last = PIPELINE
    torch.manual_seed(s.run.seed)
    base = Curve("pipeline")
    model = build_model(s.model).to(rt.device)
    for i, stage in enumerate(small):
        if stage.grow is not None:
            model = timed(base, lambda: grow_verified(stage, model, data, s, rt))
            base.phase_starts.append(base.flops[-1])
        run_phase(model, stage_phase(stage, s, last=False), s, rt, data, base)
        if i == 0:
            first_state, after_first = {k: v.clone() for k, v in model.state_dict().items()}, data.batches.state_dict()
            first_model, first_elapsed, first_points = model, base.elapsed, len(base.flops)
    small_lrs = {st.name: getattr(tc, f"{st.name}_lr") for st in small}
    after_small, rng = data.batches.state_dict(), torch.get_rng_state()
    curves = []
    for lr, noise in variants:
        curve = branch(base, f"pipeline, {last.name} lr {lr:g}, noise {noise:g}", {**small_lrs, last.name: lr,
                                                                                   "noise_std": noise})
        data.batches.load_state_dict(after_small)
        torch.set_rng_state(rng)
        grow = lambda: grow_verified(last, model, data, with_noise(s, noise), rt)  # noqa: E731
        grown_phase(curve, grow, s, rt, data, lr, steps=getattr(tc, f"{last.name}_steps"))
        curves.append(curve)
    budget = curves[0].flops[-1]
    if "small_moe" in arms:  # the last use of `model`: growth copied it, so it is still the small stage's model
        data.batches.load_state_dict(after_small)
        torch.set_rng_state(rng)
        prev = small[-1]
        curve = branch(base, "small MoE, no growth", {**small_lrs, f"{prev.name}_continued": small_lrs[prev.name]})
        steps = steps_to_budget(model, tc, curve, budget)
        run_phase(model, Phase(f"{prev.name}_continued", f"{prev.title} continued", steps, small_lrs[prev.name]),
                  s, rt, data, curve)
        curves.append(curve)
    if "dense_grown" in arms:
        first_model.load_state_dict(first_state)
        data.batches.load_state_dict(after_first)
        lr, noise = variants[0]
        n = first_points
        curve = Curve("dense grown (no MoE)", base.flops[:n], base.wall[:n], base.loss[:n],
                      lr={small[0].name: small_lrs[small[0].name], last.name: lr, "noise_std": noise},
                      elapsed=first_elapsed)
        grow = lambda: grow_verified(last, first_model, data, with_noise(s, noise), rt)  # noqa: E731
        grown_phase(curve, grow, s, rt, data, lr, budget=budget)
        curves.append(curve)
    data.batches.load_state_dict(start)
    return curves


def with_noise(s: Settings, noise_std: float) -> Settings:
    return replace(s, growth=replace(s.growth, noise_std=noise_std))


def scratch_arm(s: Settings, rt, data, lr: float, flops_budget: float, steps: int | None) -> Curve:
    """The final architecture from a fresh init, trained with one cosine schedule to the FLOP budget."""
    g = s.growth
    cfg = grown_config(replace(s.model, n_experts=g.n_experts, top_k=g.top_k), g.scale_factor, g.extra_layers)
    torch.manual_seed(s.run.seed)
    model = build_model(cfg).to(rt.device)
    curve = Curve(f"scratch, lr {lr:g}", lr=dict(scratch=lr))
    steps = steps or steps_to_budget(model, s.train, curve, flops_budget)
    start = data.batches.state_dict()
    run_phase(model, Phase("scratch", "scratch", steps, lr), s, rt, data, curve)
    data.batches.load_state_dict(start)
    return curve


def first_reach(curve: Curve, target: float, axis: str = "flops") -> float | None:
    """Linear interpolation of the x (FLOPs or wall) at which curve's eval loss first falls to target."""
    xs, ys = getattr(curve, axis), curve.loss
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return xs[0]
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (xs[i] - x0) * (y0 - target) / (y0 - y)
    return None


def loss_at(curve: Curve, x: float, axis: str = "flops") -> float | None:
    """Eval loss interpolated at x, None outside the curve's range."""
    xs, ys = getattr(curve, axis), curve.loss
    if not xs or x < xs[0] or x > xs[-1] * (1 + 1e-9):
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[-1]


def compare(pipe: Curve, scratch: Curve) -> dict:
    """The headline figures of one pipeline curve against one scratch curve."""
    out = dict(pipeline=pipe.name, scratch=scratch.name, pipeline_final=pipe.loss[-1], scratch_final=scratch.loss[-1],
               pipeline_tflop=pipe.flops[-1] / 1e12, scratch_tflop=scratch.flops[-1] / 1e12)
    reach = first_reach(pipe, scratch.loss[-1])
    if reach is not None:
        out["flop_ratio"] = scratch.flops[-1] / reach  # >1: the pipeline needs that many times fewer FLOPs
        out["reach_tflop"] = reach / 1e12
        wall = first_reach(pipe, scratch.loss[-1], "wall")
        out["wall_ratio"] = scratch.wall[-1] / wall
    else:
        back = first_reach(scratch, pipe.loss[-1])
        out["scratch_reaches_pipeline_final_at_tflop"] = None if back is None else back / 1e12
        out["flop_ratio"] = None if back is None else back / pipe.flops[-1]  # <1: growth cost FLOPs
    budget = min(pipe.flops[-1], scratch.flops[-1])
    for frac in (0.5, 1.0):
        a, b = loss_at(pipe, frac * budget), loss_at(scratch, frac * budget)
        out[f"gap_at_{int(frac * 100)}pct"] = None if a is None or b is None else a - b  # <0: pipeline lower
    return out


def plot(curves: list[Curve], path: str, title: str, from_flops: float = 0.0) -> None:
    """Eval loss against training FLOPs (left) and wall time (right); dots mark growth points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, axis, scale, label in ((axes[0], "flops", 1e12, "training TFLOPs"), (axes[1], "wall", 60, "wall minutes")):
        for c in curves:
            style = "--" if "scratch" in c.name else "-"
            keep = [i for i, f in enumerate(c.flops) if f >= from_flops]
            xs = getattr(c, axis)
            (line,) = ax.plot([xs[i] / scale for i in keep], [c.loss[i] for i in keep], style, label=c.name, lw=1.6)
            for f in c.phase_starts:  # growth points, drawn at their x on this axis
                i = next(j for j, x in enumerate(c.flops) if x >= f)
                if i in keep:
                    ax.plot(xs[i] / scale, c.loss[i], "o", color=line.get_color(), ms=4)
        ax.set_xlabel(label)
        ax.set_ylabel("eval loss (held-out stories)")
        ax.grid(alpha=0.3)
        lo = min(min(c.loss) for c in curves)
        hi = max(max(y for y, f in zip(c.loss, c.flops) if f >= from_flops) for c in curves)
        ax.set_ylim(lo - 0.05, min(hi, lo + 1.2) + 0.05)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def parse_args(argv: list[str]):
    p = make_parser(__doc__.split("\n\n")[0], epilog="Settings (on top of the scale's preset) follow.")
    p.add_argument("--scale", default="cpu", choices=list(SCALES))
    p.add_argument("--data-files", nargs="+", help="TinyStories .txt / .json(l); default: the hub, else generated")
    p.add_argument("--out-dir", default=None, help="default bench/results/growth_<scale>")
    p.add_argument("--arms", default="pipeline,scratch", help=f"comma list of {', '.join(sorted(ARMS))}")
    p.add_argument("--grown_lrs", default=None, help="phase-3 LRs, comma separated (default: the preset's grown_lr)")
    p.add_argument("--noise_stds", default=None, help="growth noise_std values, comma separated; every LR is "
                   "tried with every value (default: the preset's noise_std)")
    p.add_argument("--scratch_lrs", default=None, help="scratch LRs, comma separated (default: the preset's dense_lr, "
                   "like phase 1 a fresh init; on the CPU scale 2e-3 beat 1e-3)")
    p.add_argument("--scratch_steps", type=int, default=None, help="default: as many FLOPs as the pipeline")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--plot-runs", nargs="+", metavar="DIR", help="no training: draw the curves of earlier runs' "
                   "results.json together into --out-dir/runs_compared.png")
    p.add_argument("--from-tflop", type=float, default=0.0, help="with --plot-runs: start the x axis here")
    p.add_argument("--match", nargs="+", default=None, help="with --plot-runs: only curves whose label contains "
                   "one of these strings")
    return parse_command_line(p, argv)


def plot_runs(dirs: list[str], out_dir: str, from_tflop: float, match: list[str] | None = None) -> int:
    """Overlay the curves of several finished runs (each labelled with its directory name)."""
    curves = []
    for d in dirs:
        path = os.path.join(d, "results.json")
        if not os.path.exists(path):
            print(f"error: {path} not found; --plot-runs takes directories of finished runs", file=sys.stderr)
            return 2
        for c in json.load(open(path))["curves"]:
            label = f"{os.path.basename(os.path.normpath(d))}: {c['name']}"
            if match is None or any(m in label for m in match):
                curves.append(Curve(**{**c, "name": label}))
    if not curves:
        print(f"error: no curve matches {match}", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "runs_compared.png")
    plot(curves, png, "eval loss of several runs", from_tflop * 1e12)
    print(f"wrote {png}")
    return 0


def main(argv: list[str]) -> int:
    try:
        args, overrides = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    preset, scale_overrides = SCALES[args.scale]
    out_dir = args.out_dir or os.path.join("bench", "results", f"growth_{args.scale}")
    if args.plot_runs:
        return plot_runs(args.plot_runs, out_dir, args.from_tflop, args.match)
    try:
        s = build_settings(preset, merge_overrides(place(scale_overrides), overrides))
        if args.data_files:
            check_files(args.data_files)
        arms = set(args.arms.split(","))
        if arms - ARMS or "pipeline" not in arms:
            raise ConfigError(f"--arms={args.arms}: choose from {', '.join(sorted(ARMS))} (pipeline required)")
        grown_lrs = [float(x) for x in (args.grown_lrs or str(getattr(s.train, f"{PIPELINE[-1].name}_lr"))).split(",")]
        noise_stds = [float(x) for x in (args.noise_stds or str(s.growth.noise_std)).split(",")]
        variants = [(lr, with_noise(s, noise).growth.noise_std) for lr in grown_lrs for noise in noise_stds]
        scratch_lrs = [float(x) for x in (args.scratch_lrs or str(getattr(s.train, f"{PIPELINE[0].name}_lr"))).split(",")]
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(out_dir, exist_ok=True)
    rt = setup_runtime(s.run.device)
    data = load_data(s, args.data_files, out_dir, rt)
    t0 = time.time()
    curves = pipeline_arms(s, rt, data, variants, arms)
    budget = curves[0].flops[-1]
    scratch = [scratch_arm(s, rt, data, lr, budget, args.scratch_steps) for lr in scratch_lrs] if "scratch" in arms else []
    all_curves = curves + scratch
    results = dict(settings=s.to_dict(), scale=args.scale, data_files=args.data_files, threads=torch.get_num_threads(),
                   device=str(rt.device), torch=torch.__version__, minutes=(time.time() - t0) / 60,
                   curves=[c.__dict__ for c in all_curves],
                   comparisons=[compare(p, sc) for p in curves[:len(variants)] for sc in scratch])
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(all_curves, os.path.join(out_dir, "growth_vs_scratch.png"),
         f"{args.scale} scale: eval loss vs training compute and wall time (dots: growth points)")
    report(results)
    return 0


def report(results: dict) -> None:
    print("\n" + "=" * 72 + "\nGROWTH VS SCRATCH\n" + "=" * 72)
    for c in results["curves"]:
        print(f"  {c['name']:<34} final eval loss {c['loss'][-1]:.4f} after {c['flops'][-1] / 1e12:7.2f} TFLOP, "
              f"{c['wall'][-1] / 60:5.1f} min")
    for r in results["comparisons"]:
        print(f"\n  {r['pipeline']}  vs  {r['scratch']}")
        if r.get("reach_tflop") is not None:
            print(f"    reaches scratch's final loss {r['scratch_final']:.4f} after {r['reach_tflop']:.2f} TFLOP: "
                  f"{r['flop_ratio']:.2f}x fewer FLOPs, {r['wall_ratio']:.2f}x less wall time")
        else:
            back = r["scratch_reaches_pipeline_final_at_tflop"]
            print(f"    never reaches scratch's final loss {r['scratch_final']:.4f}; scratch reaches the pipeline's "
                  f"{r['pipeline_final']:.4f} at " + ("never" if back is None else f"{back:.2f} TFLOP "
                                                       f"({r['flop_ratio']:.2f}x the pipeline's FLOPs)"))
        for k in ("gap_at_50pct", "gap_at_100pct"):
            if r[k] is not None and not math.isnan(r[k]):
                print(f"    loss gap (pipeline - scratch) at {k[7:-3]}% of the budget: {r[k]:+.4f}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

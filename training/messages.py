"""What the run tells its user on the console: the resume command (one builder for every message), a halt with
its diagnosis and last good checkpoint, and the summary."""
from __future__ import annotations

import os

from training import stages
from training.run_state.checkpoint import latest_checkpoint
from training.loop import TrainingState
from training.reporting.metrics import BAR, MetricsLog, plot_losses
from training.parallel.runtime import Runtime
from training.settings import Settings, load_saved_settings


def resume_command(out_dir: str, *settings: str) -> str:
    """The command that continues the run in out_dir, with the settings given (e.g. "--noise_std=0.3")."""
    return " ".join(["python train_tinystories.py --out-dir", out_dir, "--resume", *settings])


def resume_line(out_dir: str) -> str:
    """The command that continues the run, or what to do when nothing was saved yet."""
    if load_saved_settings(out_dir) is None:
        return "Nothing was saved yet: run the same command again to start over."
    return f"Resume with:\n  {resume_command(out_dir)}"


def resume_hint(out_dir: str, failed: list[str], s: Settings) -> str:
    """The exact command to resume after the fix; knobs the user can turn are filled in."""
    if "symmetry" in failed:
        return resume_command(out_dir, f"--noise_std={max(0.3, 2 * s.growth.noise_std):g}")
    return resume_command(out_dir)


def halt(why: str, out_dir: str, hint: str, log: MetricsLog, rt: Runtime) -> None:
    """The diagnosis, the last good checkpoint and the command to resume (printed by rank 0)."""
    if rt.is_master:
        print(f"\n✗ HALTED: {why}")
        last = latest_checkpoint(out_dir)
        if last is not None:
            print(f"Last good checkpoint: {last.path} ({last.phase}, step {last.meta['step']}"
                  f"{', end of phase' if last.meta.get('phase_done') else ''}). Nothing trained is lost.")
        print(f"After fixing, resume with:\n  {hint}")
        plot_losses(log.records(), os.path.join(out_dir, "loss_curve.png"), stages.PIPELINE)


def summary(state: TrainingState, seconds: float, out_dir: str, log: MetricsLog) -> None:
    png = plot_losses(log.records(), os.path.join(out_dir, "loss_curve.png"), stages.PIPELINE)
    print(f"\n{BAR}\nTRAINING SUMMARY\n{BAR}")
    previous = None
    for stage in stages.PIPELINE:
        if stage.name in state.eval_losses:
            loss = state.eval_losses[stage.name]
            delta = f"  ({loss - previous:+.4f})" if previous is not None else ""
            print(f"  {stage.label:<20} eval loss {loss:.4f}{delta}")
            previous = loss
    n = sum(1 for st in stages.PIPELINE if st.grow is not None)
    print(f"  {n} transitions verified. ✓ ALL CHECKS PASSED\n  Time: {seconds / 60:.1f} min")
    print(f"  Outputs in {out_dir}: report.html, metrics.jsonl, {os.path.basename(png or '')}, checkpoints/, "
          f"tokenizer/\n{BAR}")

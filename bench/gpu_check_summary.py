"""bench/gpu_check.sh's summary: the figures of a check's parts -> DIR/summary.json and the printed summary.

    python bench/gpu_check_summary.py WORK DIR     # WORK: the parts' files (or the unpacked results.tar.gz)

Missing parts read as null; figures sit beside the goals, never as verdicts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET

GOALS = ("goals (issues 11, 20): dense step >= 45% MFU in bf16; MoE step >= 35% MFU and faster than transformers' "
         "Mixtral at its fastest experts implementation")
PHASE_FILES = {"eager": "phases_eager.json", "compiled": "phases_compiled.json"}


def load(folder: str, name: str):
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def lines(folder: str, name: str) -> list[dict]:
    try:
        with open(os.path.join(folder, name)) as f:
            return [json.loads(x) for x in f if x.strip()]
    except (OSError, ValueError):
        return []


def tests(path: str) -> dict | None:
    """passed / failures / errors / skipped of a JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


def pipeline_run(records: list[dict]) -> dict | None:
    """Outcome and per-phase last speed, MFU and eval loss of a pipeline run's metrics.jsonl."""
    if not records:
        return None
    out = {"outcome": next((r["status"] for r in records if r.get("kind") == "outcome"), None), "phases": {}}
    for r in records:
        if r.get("kind") == "train":
            out["phases"].setdefault(r["phase"], {}).update(tokens_per_s=r.get("tokens_per_s"), mfu=r.get("mfu"))
        if r.get("kind") == "eval":
            out["phases"].setdefault(r["phase"], {})["eval_loss"] = r.get("loss")
    return out


def compile_gain(phases: dict) -> dict:
    """Per phase: compiled tokens/s over eager tokens/s (the figure compile's default on CUDA follows)."""
    eager, compiled = ({r["phase"]: r for r in (phases.get(k) or {}).get("phases", []) if "error" not in r}
                       for k in ("eager", "compiled"))
    return {p: compiled[p]["tokens_per_s"] / eager[p]["tokens_per_s"] for p in eager if p in compiled}


def collect(work: str, out: str) -> dict:
    """Every figure of the check, as summary.json holds it."""
    hf, mem = load(work, "throughput.json"), load(work, "memory_model_cuda.json") or load(work, "memory_model.json")
    phases = {k: load(work, f) for k, f in PHASE_FILES.items()}
    return {"parts": lines(work, "parts.jsonl"), "env": load(work, "env.json"),
            "cuda_tests": tests(os.path.join(out, "cuda_tests.xml")),
            "micro_run": pipeline_run(lines(work, "micro_run.jsonl")),
            "fsdp_run": pipeline_run(lines(work, "fsdp_run.jsonl")), "phases": phases,
            "compiled_over_eager": compile_gain(phases),
            "vs_transformers": hf and {k: hf.get(k) for k in ("speedup", "steps", "hf_experts", "hf_all", "precision")},
            "memory_model": mem and {"summary": mem.get("summary"), "cases": len(mem.get("rows", []))}, "goals": GOALS}


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def gib(x) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def show(r: dict) -> None:
    env = r["env"]
    if env:
        dirty = " (dirty)" if env.get("git_dirty") else ""
        print(f"  {env.get('gpu_name', 'no CUDA device')}, {env.get('gpu_memory_gib', '?')} GiB; torch {env['torch']}, "
              f"CUDA {env['cuda']}; commit {(env.get('git_commit') or '?')[:10]}{dirty}")
    for p in r["parts"]:
        print(f"  {p['part']:<15} {p['status']:<10} exit {p['exit_code']:<4} {p['wall_s']:>6.1f} s of {p['limit_s']} s")
    t = r["cuda_tests"]
    if t:
        print(f"  CUDA tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped")
    for key, label in (("micro_run", "micro pipeline (compile, bf16)"), ("fsdp_run", "micro pipeline, FSDP, 1 process")):
        show_run(r[key], label)
    for kind, phases in r["phases"].items():
        show_phases(kind, phases)
    if r["compiled_over_eager"]:
        print("  compiled / eager tokens/s: " + ", ".join(f"{p} {x:.2f}x" for p, x in r["compiled_over_eager"].items()))
    show_hf(r["vs_transformers"])
    mem = r["memory_model"]
    if mem:
        errors = ", ".join(f"{k} {100 * v:.1f}%" for k, v in (mem.get("summary") or {}).items())
        print(f"  memory model, plan vs measured over {mem['cases']} cases: {errors}")
    print(f"  {GOALS}")


def show_run(m: dict | None, label: str) -> None:
    if not m:
        return
    print(f"  {label}: outcome {m['outcome']}")
    for name, x in m["phases"].items():
        loss, speed = x.get("eval_loss"), x.get("tokens_per_s")
        print(f"    {name:<6} last eval loss {'n/a' if loss is None else format(loss, '.4f')}, "
              f"{'n/a' if speed is None else format(speed, ',.0f')} tok/s, MFU {pct(x.get('mfu'))}")


def show_phases(kind: str, phases: dict | None) -> None:
    if not phases:
        return
    peak = phases.get("peak_flops")
    print(f"  phases, {kind} ({phases['preset']} preset, {phases['precision']}; MFU against "
          f"{'an unknown peak' if not peak else f'{peak / 1e12:.0f} TFLOP/s'}; plan: {phases['plan']}):")
    for x in phases["phases"]:
        if "error" in x:
            print(f"    {x['phase']:<6} error: {x['error'][:200]}")
            continue
        ratio = x.get("memory_ratio")
        print(f"    {x['phase']:<6} {x['ms_per_step']:7.1f} ms/step {x['tokens_per_s']:>11,.0f} tok/s  "
              f"MFU {pct(x['mfu'])} (goal {pct(x['mfu_goal'])}, plan {pct(x.get('planned_mfu'))})  "
              f"peak {gib(x['peak_memory_bytes'])}, plan {gib(x.get('planned_step_peak_bytes'))}, measured/plan "
              f"{'n/a' if ratio is None else format(ratio, '.2f')}")


def show_hf(hf: dict | None) -> None:
    if not hf:
        return
    print(f"  vs transformers ({hf.get('precision')}, eager, same shapes; its experts at their fastest):")
    for x in hf["steps"]:
        print(f"    {x['model']:<7} {x['contender']:<11} {x['ms']:7.1f} ms/step  MFU {pct(x['mfu'])}")
    for kind, x in hf["speedup"].items():
        other = "Llama" if kind == "dense" else f"Mixtral ({(hf.get('hf_experts') or {}).get(kind)})"
        print(f"    {kind:<7} project is {x:.2f}x the speed of transformers' {other}")


def missing(work: str, out: str) -> list[str]:
    expected = [os.path.join(out, "cuda_tests.xml")] + [os.path.join(work, f) for f in (
        "parts.jsonl", "env.json", "micro_run.jsonl", *PHASE_FILES.values(), "fsdp_run.jsonl", "throughput.json")]
    return [os.path.basename(f) for f in expected if not os.path.exists(f)]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work", help="the parts' files (the check's scratch folder, or its unpacked results.tar.gz)")
    p.add_argument("out", help="the results folder: reads cuda_tests.xml there, writes summary.json there")
    a = p.parse_args(argv)
    work, out = a.work, a.out
    result = collect(work, out)
    with open(os.path.join(out, "summary.json.tmp"), "w") as f:
        json.dump(result, f, indent=1)
    os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
    print(f"\nGPU CHECK SUMMARY ({out})")
    show(result)
    gone = missing(work, out)
    if gone:
        print(f"  no result (see the parts' logs in results.tar.gz): {', '.join(gone)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

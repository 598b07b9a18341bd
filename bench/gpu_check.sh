#!/usr/bin/env bash
# The project's GPU check: about 8 minutes on one H100/H200 (16 CPU cores, no internet), every result as JSON
# in one folder.
#
#   bench/gpu_check.sh [DIR]             results in DIR (default: $OUT if set, else bench/results/gpu_check)
#   bench/gpu_check.sh --dry-run [DIR]   print each part's time limit and commands; run and write nothing
#   bench/gpu_check.sh --summary [DIR]   print the summary of a finished check again
#
# Parts, in order, each under `timeout` (seconds; set the named variable to change a limit):
#   1 env          LIMIT_ENV=20      env.json: torch, CUDA, GPU name and memory, git commit; nvidia_smi.txt
#   2 cuda_tests   LIMIT_TESTS=135   pytest -m cuda tests/test_cuda.py -> cuda_tests.xml (JUnit)
#   3 micro_run    LIMIT_MICRO=105   micro pipeline on CUDA, compile, bf16, generated stories -> micro_run/
#   4 phases       LIMIT_PHASES=125  bench/phase_throughput.py, cuda preset shapes -> phase_throughput.json
#   5 vs_hf        LIMIT_HF=45       bench/throughput.py in bf16 against transformers -> throughput/throughput.json
#   6 memory       LIMIT_MEMORY=25   bench/memory_model.py on CUDA, when the file exists -> memory_model/
# Total 455 s, plus 3 s of grace per part to kill a process that ignores SIGTERM. PHASE_STEPS (default 100)
# sets the timed steps per phase of part 4. Each part's output is in logs/<part>.log; parts.jsonl records its
# command, exit code, status (ok | failed | timed_out | skipped) and wall time. A failed part does not stop
# the next. summary.json and the printed summary hold the figures, with the speed goals beside them (dense
# step >= 45% MFU in bf16; MoE step >= 35% and faster than transformers' Mixtral): figures, not verdicts.
# Exit 0 when every part exited 0, else 1; 2 for a bad argument.
set -u -o pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$SELF")")
PY=${PYTHON:-$(command -v python || command -v python3)}
LIMIT_ENV=${LIMIT_ENV:-20} LIMIT_TESTS=${LIMIT_TESTS:-135} LIMIT_MICRO=${LIMIT_MICRO:-105}
LIMIT_PHASES=${LIMIT_PHASES:-125} LIMIT_HF=${LIMIT_HF:-45} LIMIT_MEMORY=${LIMIT_MEMORY:-25}
PHASE_STEPS=${PHASE_STEPS:-100}
GRACE=3
PARTS=(env cuda_tests micro_run phases vs_hf memory)
RESULTS=(parts.jsonl summary.json logs env.json nvidia_smi.txt cuda_tests.xml micro_run phase_throughput.json
         throughput memory_model)  # everything the check writes in its folder
# Offline: the hub is unreachable, and the micro run then uses the project's generated stories at once.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

usage() { sed -n '2,/^set -u/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; }

# run COMMAND...: execute it, or under --dry-run print it (indented) instead.
run() {
    if [ "$MODE" = dry ]; then
        printf '      %s\n' "$*"
        return 0
    fi
    "$@"
}

# ------------------------------------------------------------------------------------------- the parts
part_env() {
    run nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv \
        -f "$DIR/nvidia_smi.txt"
    run "$PY" - "$DIR/env.json" <<'EOF'
"""Facts of the machine and the checkout -> env.json; exit 1 when torch sees no CUDA device."""
import json, os, platform, subprocess, sys
import torch

def version(module):
    try:
        return __import__(module).__version__
    except Exception:
        return None

def git(*args):
    r = subprocess.run(["git", *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None

facts = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
         "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
         "triton": version("triton"), "transformers": version("transformers"),
         "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
         "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts.update(gpu_name=p.name, gpu_memory_bytes=p.total_memory, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 compute_capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                 bf16_supported=torch.cuda.is_bf16_supported())
json.dump(facts, open(sys.argv[1], "w"), indent=1)
print(json.dumps(facts, indent=1))
sys.exit(0 if facts["cuda_available"] else 1)
EOF
}

part_cuda_tests() {
    run "$PY" -m pytest -m cuda tests/test_cuda.py -rs -p no:cacheprovider --junitxml="$DIR/cuda_tests.xml"
}

part_micro_run() {
    # Checkpoints go to scratch space; the results keep what describes the run.
    local scratch=$WORK/micro_run rc
    run rm -rf "$scratch"
    run "$PY" train_tinystories.py --preset micro --device=cuda --compile=true --precision=bf16 --out-dir "$scratch"
    rc=$?
    run mkdir -p "$DIR/micro_run"
    for f in metrics.jsonl settings.json data_source.json loss_curve.png; do
        if [ "$MODE" = dry ] || [ -f "$scratch/$f" ]; then run cp "$scratch/$f" "$DIR/micro_run/"; fi
    done
    run rm -rf "$scratch"
    return $rc
}

part_phases() {
    run "$PY" bench/phase_throughput.py --preset cuda --device=cuda --compile=true --precision=bf16 \
        --steps "$PHASE_STEPS" --warmup 8 --out "$DIR/phase_throughput.json"
}

part_vs_hf() {
    # The cuda preset's phase-1 shapes, batch 64 x 512; 8 experts as the preset's MoE.
    run "$PY" bench/throughput.py --out-dir "$DIR/throughput" --reps 10 --experts 8 --vocab_size=4096 --dim=512 \
        --n_layers=8 --n_heads=8 --max_seq_len=512 --seq_len=512 --batch_size=64
}

part_memory() {
    if [ ! -f bench/memory_model.py ]; then
        echo "bench/memory_model.py is not in this checkout: skipped"
        return 3  # the runner records 3 as skipped
    fi
    run "$PY" bench/memory_model.py --device=cuda --out-dir "$DIR/memory_model"
}

limit_of() {
    case $1 in
        env) echo "$LIMIT_ENV" ;; cuda_tests) echo "$LIMIT_TESTS" ;; micro_run) echo "$LIMIT_MICRO" ;;
        phases) echo "$LIMIT_PHASES" ;; vs_hf) echo "$LIMIT_HF" ;; memory) echo "$LIMIT_MEMORY" ;;
    esac
}

# ------------------------------------------------------------------------------------------- the runner
json_string() {  # a JSON string literal of $1 (backslashes, quotes, tabs and newlines escaped)
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/\\t}
    s=${s//$'\n'/\\n}
    printf '"%s"' "$s"
}

now() { date +%s.%N; }

# run_part NAME: the part in a child shell under timeout, its output in logs/NAME.log, one line in parts.jsonl.
run_part() {
    local name=$1 limit rc status start wall commands
    limit=$(limit_of "$name")
    if [ "$MODE" = dry ]; then
        echo "== $name (limit ${limit}s)"
        "part_$name"
        return 0
    fi
    printf '== %-10s (limit %4ss) ... ' "$name" "$limit"
    start=$(now)
    timeout --kill-after="$GRACE" "$limit" bash "$SELF" --part "$name" "$DIR" > "$DIR/logs/$name.log" 2>&1
    rc=$?
    wall=$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;; 3) [ "$name" = memory ] && status=skipped || status=failed ;;
        124 | 137) status=timed_out ;; *) status=failed ;;
    esac
    echo "$status (exit $rc) in ${wall}s"
    [ "$status" = ok ] || [ "$status" = skipped ] || tail -n 5 "$DIR/logs/$name.log" | sed 's/^/      | /'
    commands=$(MODE=dry && "part_$name" | sed 's/^ *//')  # what it ran, as --dry-run prints it
    printf '{"part": %s, "limit_s": %s, "exit_code": %s, "status": %s, "wall_s": %s, "log": %s, "commands": %s}\n' \
        "$(json_string "$name")" "$limit" "$rc" "$(json_string "$status")" "$wall" \
        "$(json_string "logs/$name.log")" "$(json_string "$commands")" >> "$DIR/parts.jsonl"
    [ "$status" = ok ] || [ "$status" = skipped ]
}

summary() {
    "$PY" - "$DIR" <<'EOF'
"""The check's figures from the results folder -> printed summary and summary.json (missing parts: null)."""
import json, os, sys
import xml.etree.ElementTree as ET

d = sys.argv[1]
GOALS = "goals (issue 11): dense step >= 45% MFU in bf16; MoE step >= 35% MFU and faster than transformers' Mixtral"

def load(name):
    try:
        with open(os.path.join(d, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def lines(name):
    try:
        with open(os.path.join(d, name)) as f:
            return [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError):
        return []

def tests():
    try:
        root = ET.parse(os.path.join(d, "cuda_tests.xml")).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n

def micro():
    records = lines("micro_run/metrics.jsonl")
    if not records:
        return None
    out = {"outcome": next((r["status"] for r in records if r.get("kind") == "outcome"), None), "phases": {}}
    for r in records:
        if r.get("kind") == "train":
            out["phases"].setdefault(r["phase"], {}).update(tokens_per_s=r.get("tokens_per_s"), mfu=r.get("mfu"))
        if r.get("kind") == "eval":
            out["phases"].setdefault(r["phase"], {})["eval_loss"] = r.get("loss")
    return out

def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"

def tflops(x):
    return "an unknown peak" if not x else f"{x / 1e12:.0f} TFLOP/s"

def gib(x):
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"

def show_env(env):
    if env:
        dirty = " (dirty)" if env.get("git_dirty") else ""
        print(f"  {env.get('gpu_name', 'no CUDA device')}, {env.get('gpu_memory_gib', '?')} GiB; torch {env['torch']}, "
              f"CUDA {env['cuda']}; commit {(env.get('git_commit') or '?')[:10]}{dirty}")

def show_parts(parts):
    for p in parts:
        print(f"  {p['part']:<11} {p['status']:<10} exit {p['exit_code']:<4} {p['wall_s']:>6.1f} s of {p['limit_s']} s")

def show_tests(t):
    if t:
        print(f"  CUDA tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped")

def show_micro(m):
    if not m:
        return
    print(f"  micro pipeline (compile, bf16): outcome {m['outcome']}")
    for name, r in m["phases"].items():
        loss, speed = r.get("eval_loss"), r.get("tokens_per_s")
        print(f"    {name:<6} last eval loss {'n/a' if loss is None else format(loss, '.4f')}, "
              f"{'n/a' if speed is None else format(speed, ',.0f')} tok/s, MFU {pct(r.get('mfu'))}")

def show_phases(phases):
    if not phases:
        return
    print(f"  phase throughput ({phases['preset']} preset, {phases['precision']}, compile {phases['compile']}; "
          f"MFU against {tflops(phases['peak_flops'])} from training.plan.peak_flops; plan: {phases['plan']}):")
    for r in phases["phases"]:
        if "error" in r:
            print(f"    {r['phase']:<6} error: {r['error'][:200]}")
            continue
        ratio = r.get("memory_ratio")
        print(f"    {r['phase']:<6} {r['ms_per_step']:7.1f} ms/step {r['tokens_per_s']:>11,.0f} tok/s  "
              f"MFU {pct(r['mfu'])} (goal {pct(r['mfu_goal'])})  peak {gib(r['peak_memory_bytes'])}, "
              f"plan (eager) {gib(r.get('planned_step_peak_bytes'))}, measured/plan "
              f"{'n/a' if ratio is None else format(ratio, '.2f')}")

def show_hf(hf):
    if not hf:
        return
    print(f"  vs transformers ({hf['device']}, eager; MFU against the matmul peak measured in that run, "
          f"{hf['peak_gflops']:.0f} GFLOP/s):")
    for r in hf["steps"]:
        print(f"    {r['model']:<7} {r['contender']:<11} {r['ms']:7.1f} ms/step  MFU {pct(r['mfu'])}")
    for kind, x in hf["speedup"].items():
        other = "Llama" if kind == "dense" else "Mixtral"
        print(f"    {kind:<7} project is {x:.2f}x the speed of transformers' {other}")

def show_memory(mem):
    if mem:
        errors = ", ".join(f"{k} {100 * v:.1f}%" for k, v in mem.get("summary", {}).items())
        print(f"  memory model, plan vs {mem.get('measured_with')} over {len(mem.get('rows', []))} cases: {errors}")

def show_missing():
    expected = ("parts.jsonl", "env.json", "cuda_tests.xml", "micro_run/metrics.jsonl", "phase_throughput.json",
                "throughput/throughput.json")
    missing = [f for f in expected if not os.path.exists(os.path.join(d, f))]
    if missing:
        print(f"  no result (see the parts' logs): {', '.join(missing)}")

parts, env, phases = lines("parts.jsonl"), load("env.json"), load("phase_throughput.json")
hf, mem = load("throughput/throughput.json"), load("memory_model/memory_model_cuda.json")
result = {"parts": parts, "env": env, "cuda_tests": tests(), "micro_run": micro(), "phase_throughput": phases,
          "vs_transformers": hf and {"speedup": hf.get("speedup"), "steps": hf.get("steps")},
          "memory_model": mem and {"summary": mem.get("summary"), "cases": len(mem.get("rows", []))}, "goals": GOALS}
with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump(result, f, indent=1)
print(f"\nGPU CHECK SUMMARY ({d})")
show_env(env)
show_parts(parts)
show_tests(result["cuda_tests"])
show_micro(result["micro_run"])
show_phases(phases)
show_hf(hf)
show_memory(mem)
show_missing()
print(f"  {GOALS}")
EOF
}

# ------------------------------------------------------------------------------------------- main
MODE=run
DIR_ARG=
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) MODE=dry ;;
        --summary) MODE=summary ;;
        --part)  # internal: run one part's body (the runner's child under timeout)
            cd "$ROOT" && DIR=$3 MODE=run && "part_$2"
            exit $? ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "unknown option $1; see --help" >&2; exit 2 ;;
        *) DIR_ARG=$1 ;;
    esac
    shift
done
DIR=${DIR_ARG:-${OUT:-$ROOT/bench/results/gpu_check}}
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac  # relative to where the script was called from
cd "$ROOT" || exit 2

if [ "$MODE" = summary ]; then
    summary
    exit $?
fi
if [ "$MODE" = dry ]; then
    WORK=\$WORK
    echo "dry run: results would go to $DIR; nothing is run"
    for p in "${PARTS[@]}"; do run_part "$p"; done
    exit 0
fi

# An earlier check's results would pass for this one's where a part now writes nothing: remove them (only them).
(cd "$DIR" 2>/dev/null && rm -rf "${RESULTS[@]}")
mkdir -p "$DIR/logs" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
export WORK
trap 'rm -rf "$WORK"' EXIT
echo "GPU check: results in $DIR"
failed=0
for p in "${PARTS[@]}"; do run_part "$p" || failed=1; done
summary
exit $failed

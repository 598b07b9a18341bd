#!/usr/bin/env bash
# The project's GPU check, sized for the device machine: one command, about 8 minutes at most on one H100/H200
# (every part under a time limit, 450 s in all), no pip and no network, and everything it keeps comes back.
#
#   bench/gpu_check.sh [DIR]              results in DIR (default: $OUT if set, else bench/results/gpu_check)
#   bench/gpu_check.sh --rehearse [DIR]   every part on the CPU at tiny sizes, the same files (what the tests run)
#   bench/gpu_check.sh --dry-run [DIR]    print each part's time limit and commands; run and write nothing
#   bench/gpu_check.sh --summary [DIR]    print the summary of a finished check again (from DIR/results.tar.gz)
#
# DIR receives at most 4 files, none in a subfolder: summary.json (every figure, the parts' statuses),
# summary.txt (the printed summary), cuda_tests.xml (JUnit) and results.tar.gz (logs/, parts.jsonl and each
# part's JSON); parts write into a scratch folder. summary.json and the tarball are rewritten after every part,
# so a check stopped from outside still brings back the parts it finished.
#
# Parts, in order, each under `timeout` (seconds; set the named variable to change a limit):
#   1 env             LIMIT_ENV=15        env.json: torch, CUDA, GPU, git commit; nvidia_smi.txt
#   2 cuda_tests      LIMIT_TESTS=90      pytest -m cuda tests/training/parallel/test_cuda.py -> cuda_tests.xml
#                                         (grouped-matmul MoE against the loop without a sync, fullgraph bf16
#                                         compile of the MoE, ...)
#   3 micro_run       LIMIT_MICRO=60      micro pipeline, compile, bf16, generated stories -> micro_run.jsonl
#   4 phases_eager    LIMIT_EAGER=70      cuda preset at its real size, eager, PHASE_STEPS (200) steps a phase:
#                                         speed, MFU, peak memory against the plan -> phases_eager.json
#   5 phases_compiled LIMIT_COMPILED=100  the same compiled, COMPILED_STEPS (100) steps a phase -> phases_compiled.json
#   6 fsdp            LIMIT_FSDP=50       micro pipeline under torchrun, 1 process, parallel=fsdp over NCCL, bf16
#                                         -> fsdp_run.jsonl
#   7 vs_hf           LIMIT_HF=45         bench/throughput.py, bf16, against transformers at its fastest experts
#                                         implementation -> throughput.json
#   8 memory          LIMIT_MEMORY=20     bench/memory_model.py on CUDA -> memory_model_cuda.json
# Plus 3 s of grace per part; LIMIT_SCALE multiplies every limit (default 1, 4 under --rehearse). A pytest part is stopped with SIGINT (pytest then still writes its JUnit XML), any
# other with SIGTERM, then SIGKILL after the grace. parts.jsonl records each part's command, exit code, status
# (ok | failed | timed_out | skipped) and wall time; a failed part does not stop the next. The summary holds the
# figures with the speed goals beside them: figures, not verdicts. Exit 0 when every part exited 0, else 1; 2 for
# a bad argument. Python: $PYTHON, else python3, else python.
set -u -o pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$SELF")")
PY=${PYTHON:-$(command -v python3 || command -v python)}
LIMIT_ENV=${LIMIT_ENV:-15} LIMIT_TESTS=${LIMIT_TESTS:-90} LIMIT_MICRO=${LIMIT_MICRO:-60}
LIMIT_EAGER=${LIMIT_EAGER:-70} LIMIT_COMPILED=${LIMIT_COMPILED:-100} LIMIT_FSDP=${LIMIT_FSDP:-50}
LIMIT_HF=${LIMIT_HF:-45} LIMIT_MEMORY=${LIMIT_MEMORY:-20}
PHASE_STEPS=${PHASE_STEPS:-200} COMPILED_STEPS=${COMPILED_STEPS:-100}
GRACE=3
PARTS=(env cuda_tests micro_run phases_eager phases_compiled fsdp vs_hf memory)
KEPT=(summary.json summary.txt cuda_tests.xml results.tar.gz)  # all the check writes in DIR
# Offline: the hub is unreachable, and the runs then use the project's generated stories at once.
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

# The sizes: the device's, or (--rehearse) the CPU's tiny ones with the same parts and files.
sizes() {
    if [ "$REHEARSE" = 1 ]; then
        DEVICE=cpu REAL=micro STEPS=2 CSTEPS=1 WARMUP=1 TINY="--dense_steps=2 --moe_steps=2 --grown_steps=2"
        CPHASES="--phases dense" HF_SHAPES="--reps 1 --vocab_size=512 --dim=32 --n_layers=1 --n_heads=2 --seq_len=32 --batch_size=2"
        MEM_ARGS="--quick" MICRO_COMPILE=false  # compiling three phases would take minutes on a CPU
    else
        DEVICE=cuda REAL=cuda STEPS=$PHASE_STEPS CSTEPS=$COMPILED_STEPS WARMUP=5 TINY= CPHASES=
        # The cuda preset's phase-1 shapes at 8 layers, batch 64 x 512; 8 experts as the preset's MoE.
        HF_SHAPES="--reps 10 --vocab_size=4096 --dim=512 --n_layers=8 --n_heads=8 --max_seq_len=512 --seq_len=512 --batch_size=64"
        MEM_ARGS= MICRO_COMPILE=true
    fi
}

# ------------------------------------------------------------------------------------------- the parts
part_env() {
    if [ "$DEVICE" = cuda ]; then
        run nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv \
            -f "$WORK/nvidia_smi.txt"
    fi
    run "$PY" - "$WORK/env.json" "$DEVICE" <<'EOF'
"""Facts of the machine and the checkout -> env.json; exit 1 when the check's device is cuda and torch sees none."""
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

facts = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
         "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version(), "triton": version("triton"), "transformers": version("transformers"),
         "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
         "check_device": sys.argv[2], "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts.update(gpu_name=p.name, gpu_memory_bytes=p.total_memory, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 compute_capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                 bf16_supported=torch.cuda.is_bf16_supported())
json.dump(facts, open(sys.argv[1], "w"), indent=1)
print(json.dumps(facts, indent=1))
sys.exit(0 if facts["cuda_available"] or sys.argv[2] != "cuda" else 1)
EOF
}

part_cuda_tests() {
    # shellcheck disable=SC2086  # CUDA_TESTS: test files (a test points it elsewhere to check the SIGINT stop)
    run "$PY" -m pytest -m cuda ${CUDA_TESTS:-tests/training/parallel/test_cuda.py} -rs -p no:cacheprovider --junitxml="$DIR/cuda_tests.xml"
}

# pipeline NAME ARGS...: a micro pipeline run in scratch space; its metrics.jsonl is kept as NAME.jsonl.
pipeline() {
    local name=$1 scratch=$WORK/$1 rc
    shift
    run rm -rf "$scratch"
    run "$@" --out-dir "$scratch"
    rc=$?
    if [ "$MODE" = dry ] || [ -f "$scratch/metrics.jsonl" ]; then run cp "$scratch/metrics.jsonl" "$WORK/$name.jsonl"; fi
    run rm -rf "$scratch"
    return $rc
}

part_micro_run() {
    # shellcheck disable=SC2086  # TINY is a list of options
    pipeline micro_run "$PY" train_tinystories.py --preset micro --device=$DEVICE --compile=$MICRO_COMPILE \
        --precision=bf16 $TINY
}

part_phases_eager() {
    run "$PY" bench/phase_throughput.py --preset $REAL --device=$DEVICE --compile=false --precision=bf16 \
        --steps "$STEPS" --warmup "$WARMUP" --out "$WORK/phases_eager.json"
}

part_phases_compiled() {
    # shellcheck disable=SC2086  # CPHASES is a list of options
    run "$PY" bench/phase_throughput.py --preset $REAL --device=$DEVICE --compile=true --precision=bf16 \
        --steps "$CSTEPS" --warmup "$WARMUP" $CPHASES --out "$WORK/phases_compiled.json"
}

part_fsdp() {
    # One process is enough to run FSDP2's sharding, resharding and mixed precision over the device's backend.
    # shellcheck disable=SC2086
    pipeline fsdp_run "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_tinystories.py \
        --preset micro --device=$DEVICE --parallel=fsdp --precision=bf16 $TINY
}

part_vs_hf() {
    # shellcheck disable=SC2086
    run "$PY" bench/throughput.py --out-dir "$WORK" --precision=bf16 --experts 8 --skip-layer $HF_SHAPES
}

part_memory() {
    # shellcheck disable=SC2086
    run "$PY" bench/memory_model.py --device=$DEVICE $MEM_ARGS --out-dir "$WORK"
}

limit_of() {  # the part's limit in seconds, times LIMIT_SCALE (default 1; 4 in a rehearsal on a slow, shared CPU)
    echo $(( $(base_limit "$1") * ${LIMIT_SCALE:-$([ "$REHEARSE" = 1 ] && echo 4 || echo 1)} ))
}

base_limit() {
    case $1 in
        env) echo "$LIMIT_ENV" ;; cuda_tests) echo "$LIMIT_TESTS" ;; micro_run) echo "$LIMIT_MICRO" ;;
        phases_eager) echo "$LIMIT_EAGER" ;; phases_compiled) echo "$LIMIT_COMPILED" ;; fsdp) echo "$LIMIT_FSDP" ;;
        vs_hf) echo "$LIMIT_HF" ;; memory) echo "$LIMIT_MEMORY" ;;
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
    local name=$1 limit rc status start wall commands signal=TERM
    limit=$(limit_of "$name")
    if [ "$MODE" = dry ]; then
        echo "== $name (limit ${limit}s)"
        "part_$name"
        return 0
    fi
    [ "$name" = cuda_tests ] && signal=INT  # pytest writes its JUnit XML on SIGINT, not on SIGTERM
    printf '== %-15s (limit %4ss) ... ' "$name" "$limit"
    start=$(now)
    timeout --signal="$signal" --kill-after="$GRACE" "$limit" bash "$SELF" --part "$name" "$DIR" "$WORK" "$REHEARSE" \
        > "$WORK/logs/$name.log" 2>&1
    rc=$?
    wall=$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;; 124 | 137) status=timed_out ;; *) status=failed ;;
    esac
    echo "$status (exit $rc) in ${wall}s"
    [ "$status" = ok ] || tail -n 5 "$WORK/logs/$name.log" | sed 's/^/      | /'
    commands=$(MODE=dry && "part_$name" | sed 's/^ *//')  # what it ran, as --dry-run prints it
    printf '{"part": %s, "limit_s": %s, "exit_code": %s, "status": %s, "wall_s": %s, "log": %s, "commands": %s}\n' \
        "$(json_string "$name")" "$limit" "$rc" "$(json_string "$status")" "$wall" \
        "$(json_string "logs/$name.log")" "$(json_string "$commands")" >> "$WORK/parts.jsonl"
    [ "$status" = ok ]
}

# bring_back: summary.json and summary.txt from the scratch folder, then the tarball of it, each atomically.
bring_back() {
    summary "$WORK" > "$DIR/summary.txt.tmp" && mv "$DIR/summary.txt.tmp" "$DIR/summary.txt"
    tar -czf "$DIR/results.tar.gz.tmp" -C "$WORK" --exclude='./micro_run' --exclude='./fsdp_run' . \
        && mv "$DIR/results.tar.gz.tmp" "$DIR/results.tar.gz"
}

summary() {
    "$PY" "$ROOT/bench/gpu_check_summary.py" "$1" "$DIR"
}

# ------------------------------------------------------------------------------------------- main
MODE=run
REHEARSE=0
DIR_ARG=
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) MODE=dry ;;
        --summary) MODE=summary ;;
        --rehearse) REHEARSE=1 ;;
        --part)  # internal: run one part's body (the runner's child under timeout)
            cd "$ROOT" && DIR=$3 WORK=$4 REHEARSE=$5 MODE=run && sizes && "part_$2"
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
sizes

if [ "$MODE" = summary ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
    trap 'rm -rf "$WORK"' EXIT
    tar -xzf "$DIR/results.tar.gz" -C "$WORK" 2>/dev/null
    summary "$WORK"
    exit 0
fi
if [ "$MODE" = dry ]; then
    WORK=\$WORK
    echo "dry run: results would go to $DIR; nothing is run"
    for p in "${PARTS[@]}"; do run_part "$p"; done
    exit 0
fi

# An earlier check's results would pass for this one's where a part now writes nothing: remove them (only them).
(cd "$DIR" 2>/dev/null && rm -f "${KEPT[@]}")
mkdir -p "$DIR" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
mkdir -p "$WORK/logs"
trap 'rm -rf "$WORK"' EXIT
echo "GPU check$([ "$REHEARSE" = 1 ] && echo ' (rehearsal on the CPU, tiny sizes)'): results in $DIR"
failed=0
for p in "${PARTS[@]}"; do
    run_part "$p" || failed=1
    bring_back
done
cat "$DIR/summary.txt"
exit $failed

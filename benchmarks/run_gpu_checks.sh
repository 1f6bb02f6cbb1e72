#!/usr/bin/env bash
# Every GPU check of issue 12 in one run: each benchmark with --device, JSON and a log per check under one folder.
#
#   bash benchmarks/run_gpu_checks.sh                       # on a GPU machine: --device cuda, full sizes
#   bash benchmarks/run_gpu_checks.sh --device cpu --quick  # the harness itself, on CPU (tests/test_benchmarks.py)
#
# Options: --device DEV (default cuda), --quick (tiny sizes), --out DIR (default gpu-checks-<UTC time>),
# --only NAME[,NAME...] (run just those checks, in that order, e.g. bench_throughput,bench_memory_estimate),
# --opts NAME='OPTIONS' (more options for one check, e.g. --opts bench_bptt='--frames 75'; repeatable),
# --deadline SECONDS (wall-clock budget of the whole run: each check is cut off when it runs out, and the
# checks after it are SKIPPED; put the important ones first with --only).
# Checks: bench_calculator bench_scaling bench_relax bench_bptt bench_memory_estimate bench_throughput demo.
# Python: $PYTHON, else .venv/bin/python, else python3. A failing check does not stop the others;
# the exit status is non-zero if any failed, and summary.txt lists each check's status and time.
set -u
cd "$(dirname "$0")/.."

all_checks="bench_calculator bench_scaling bench_relax bench_bptt bench_memory_estimate bench_throughput demo"
device=cuda quick="" out="" only="" deadline=""
declare -A opts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick="--quick"; shift ;;
        --out) out="$2"; shift 2 ;;
        --only) only="${2//,/ }"; shift 2 ;;
        --opts) opts["${2%%=*}"]="${2#*=}"; shift 2 ;;
        --deadline) deadline="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "run_gpu_checks.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
out="${out:-gpu-checks-$(date -u +%Y%m%dT%H%M%SZ)}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
mkdir -p "$out"

{
    date -u +"date_utc %Y-%m-%dT%H:%M:%SZ"
    echo "device $device ${quick:-full}"
    uptime
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} > "$out/machine.txt" 2>&1

failed=0
: > "$out/summary.txt"
check() {  # check NAME COMMAND...: run it (plus --opts NAME=...), log to NAME.log, record status and seconds
    local name="$1"; shift
    local t0=$SECONDS limit=() rc
    if [ -n "$deadline" ]; then
        local left=$((deadline - SECONDS))
        if [ "$left" -lt 10 ]; then
            echo "$name SKIPPED (deadline of ${deadline}s reached) 0s" | tee -a "$out/summary.txt"; failed=1; return
        fi
        limit=(timeout -k 10 "$left")
    fi
    # shellcheck disable=SC2086  # the extra options are split into words on purpose
    set -- "$@" ${opts[$name]:-}
    echo "== $name: $*"
    "${limit[@]}" "$@" > "$out/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then status=ok
    elif [ -n "$deadline" ] && { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; }; then status="TIMED OUT (deadline)"; failed=1
    else status="FAILED (exit $rc)"; failed=1; fi
    echo "$name $status $((SECONDS - t0))s" | tee -a "$out/summary.txt"
}
bench() {  # bench SCRIPT [extra options]: a benchmark with the shared options, JSON under $out
    local name="$1"; shift
    check "$name" "$python" "benchmarks/$name.py" --device "$device" $quick --out "$out/$name.json" "$@"
}
run_one() {
    case "$1" in
        bench_throughput) bench bench_throughput --time-limit 60 ;;
        demo)  # the end-to-end run the issue timed (minutes on CPU, so not in --quick)
            if [ -z "$quick" ]; then
                check demo "$python" -m ase_bptt.cli demo --quick --device "$device" --out "$out/demo-out"
            fi ;;
        bench_*) bench "$1" ;;
        *) echo "run_gpu_checks.sh: unknown check $1 (one of: $all_checks)" >&2; failed=1 ;;
    esac
}

for name in ${only:-$all_checks}; do
    run_one "$name"
done

echo "results in $out (summary.txt, one JSON and log per check)"
exit $failed

#!/usr/bin/env bash
# Every GPU check of issue 12 in one run: each benchmark with --device, JSON and a log per check under one folder.
#
#   bash benchmarks/run_gpu_checks.sh                       # on a GPU machine: --device cuda, full sizes
#   bash benchmarks/run_gpu_checks.sh --device cpu --quick  # the harness itself, on CPU (tests/test_benchmarks.py)
#
# Options: --device DEV (default cuda), --quick (tiny sizes), --out DIR (default gpu-checks-<UTC time>),
# --only NAME[,NAME...] (run just those checks, e.g. bench_throughput,bench_memory_estimate).
# Python: $PYTHON, else .venv/bin/python, else python3. A failing check does not stop the others;
# the exit status is non-zero if any failed, and summary.txt lists each check's status and time.
set -u
cd "$(dirname "$0")/.."

device=cuda quick="" out="" only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick="--quick"; shift ;;
        --out) out="$2"; shift 2 ;;
        --only) only=",$2,"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
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
check() {  # check NAME COMMAND...: run it, log to NAME.log, record status and seconds
    local name="$1"; shift
    if [ -n "$only" ] && [[ "$only" != *",$name,"* ]]; then return; fi
    local t0=$SECONDS
    echo "== $name: $*"
    if "$@" > "$out/$name.log" 2>&1; then status=ok; else status="FAILED (exit $?)"; failed=1; fi
    echo "$name $status $((SECONDS - t0))s" | tee -a "$out/summary.txt"
}
bench() {  # bench SCRIPT [extra options]: a benchmark with the shared options, JSON under $out
    local name="$1"; shift
    check "$name" "$python" "benchmarks/$name.py" --device "$device" $quick --out "$out/$name.json" "$@"
}

bench bench_calculator
bench bench_scaling
bench bench_relax
bench bench_bptt
bench bench_memory_estimate
bench bench_throughput --time-limit 60
if [ -z "$quick" ]; then  # the end-to-end run the issue timed (minutes on CPU, so not in --quick)
    check demo "$python" -m ase_bptt.cli demo --quick --device "$device" --out "$out/demo-out"
fi

echo "results in $out (summary.txt, one JSON and log per check)"
exit $failed

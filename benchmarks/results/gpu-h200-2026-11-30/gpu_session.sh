#!/usr/bin/env bash
# One device session on the lent H200 (no package index there): install the carried wheels, check the
# imports, then benchmarks/run_gpu_checks.sh --device cuda with the important checks first and a deadline.
# Everything it makes is packed into $OUT every 15 s, so a timeout still brings the finished checks back.
#
#   bash .scratch/gpu_session.sh            # run tool: carry [".scratch"], timeout_s ~530
#
# $OUT (set by the run tool; /tmp/gpu-out elsewhere) gets: session.log, gpu-checks.tgz (the whole results
# folder, without model checkpoints and databases), summary.txt and machine.txt.
set -u
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-505}   # seconds for this script, from its start; the run's timeout_s should be ~25 s more
OUT=${OUT:-/tmp/gpu-out}
W=/tmp/gpu-checks
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/session.log") 2>&1
# For a dry run elsewhere: PY (python), DEVICE, QUICK=--quick, WHL (wheel folder), EDITABLE=0.
PY=${PY:-python3} DEVICE=${DEVICE:-cuda} QUICK=${QUICK:-} WHL=${WHL:-.scratch/whl} EDITABLE=${EDITABLE:-1}
export PYTHONUNBUFFERED=1 PYTHON="$PY"

pack() {  # the results folder as one file in $OUT (at most 8 files come back, 2 folders deep)
    tar czf "$OUT/partial.tgz" -C /tmp --exclude='*.pt' --exclude='*.db' --exclude='*.db-journal' gpu-checks 2>/dev/null \
        && mv -f "$OUT/partial.tgz" "$OUT/gpu-checks.tgz"
    cp -f "$W/summary.txt" "$W/machine.txt" "$OUT/" 2>/dev/null
    return 0
}
(while sleep 15; do pack; done) &
packer=$!

echo "== $(date -u +%FT%TZ) start; budget ${BUDGET}s"
echo "== install (offline wheels from $WHL)"
core=() ts=()
for w in "$WHL"/*.whl; do
    case "$(basename "$w")" in
        torch_sim*|tables-*|numexpr-*|vesin*) ts+=("$w") ;;
        *) core+=("$w") ;;
    esac
done
pipi() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pipi /tmp/site "${core[@]}" || echo "!! core wheel install failed"
pipi /tmp/site-ts "${ts[@]}" || echo "!! TorchSim wheel install failed"
# The package itself: editable install where the image's setuptools can build it, else from the checkout.
if [ "$EDITABLE" = 1 ]; then
    timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . \
        && echo "ase-bptt installed editable" || echo "(editable install not possible here: using PYTHONPATH=$PWD)"
fi
export PYTHONPATH="/tmp/site:$PWD"

echo "== machine"
command -v nvidia-smi > /dev/null && nvidia-smi
"$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("numpy", "scipy", "ase", "pymatgen.core", "matscipy", "click", "tqdm", "matplotlib", "ase_bptt"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')} {getattr(m, '__file__', '')}")
    except Exception as exc:  # report, do not stop: the checks say what fails
        print(f"!! import {name}: {exc!r}")
EOF
"$PY" -m ase_bptt.cli --help > /dev/null && echo "ase-bptt CLI ok" || echo "!! "$PY" -m ase_bptt.cli --help failed"

echo "== TorchSim smoke test on $DEVICE (bench_throughput --quick with torch_sim)"
if PYTHONPATH="/tmp/site-ts:$PYTHONPATH" timeout 120 "$PY" benchmarks/bench_throughput.py --quick --device "$DEVICE" ${QUICK:+--threads 1} \
    --out /tmp/smoke-throughput.json > /tmp/smoke.log 2>&1 && grep -q torchsim_fire /tmp/smoke.log; then
    export PYTHONPATH="/tmp/site-ts:$PYTHONPATH"
    "$PY" -c "import torch_sim, importlib.metadata as m; print('torch_sim', m.version('torch-sim-atomistic'), 'ok')"
else
    echo "!! TorchSim smoke test failed: bench_throughput runs without it (its TorchSim row is skipped)"
    tail -30 /tmp/smoke.log
fi
cp /tmp/smoke.log "$W/smoke-throughput.log" 2>/dev/null

left=$((BUDGET - SECONDS - 15))
echo "== $(date -u +%FT%TZ) checks, ${left}s left"
ONLY=${ONLY:-bench_calculator,bench_throughput,bench_bptt,demo,bench_memory_estimate,bench_scaling,bench_relax}
if [ -z "$QUICK" ]; then
    opts=(--opts bench_throughput='--sizes 1 4 16 32 256 1024 4096 --repeats 3'
          --opts bench_bptt='--sizes 64 --frames 75 --batch 1 32 256 --variants naive checkpoint_frames --repeats 3'
          --opts bench_relax='--repeats 2')
else  # a dry run of this script on a small CPU machine
    opts=(--opts bench_throughput='--threads 1 --sizes 1 2' --opts bench_bptt='--threads 1 --batch 1 2'
          --opts bench_calculator='--threads 1')
fi
bash benchmarks/run_gpu_checks.sh --device "$DEVICE" $QUICK --out "$W" --deadline "$left" --only "$ONLY" "${opts[@]}"
echo "run_gpu_checks.sh exit $?"

echo "== per-check sanity"
for j in "$W"/*.json; do
    [ -e "$j" ] || continue
    "$PY" - "$j" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))
env = p.get("environment", {})
print(f"--- {p.get('benchmark')}: {env.get('device_name')} torch {env.get('torch')} {env.get('date_utc')}")
print(p.get("table", "(no table)"))
EOF
done
while read -r name status rest; do
    if [ "$status" != ok ] && [ -e "$W/$name.log" ]; then echo "--- $name $status $rest: end of its log"; tail -25 "$W/$name.log"; fi
done < "$W/summary.txt"
grep -h -i -E "wall|total|seconds| s$" "$W/demo.log" 2>/dev/null | tail -15
echo "== $(date -u +%FT%TZ) done after ${SECONDS}s"
kill "$packer" 2>/dev/null
pack
ls -la "$OUT"

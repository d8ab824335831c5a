#!/usr/bin/env bash
# One-call GPU check of the fused kernels and of decoding on CUDA (issue 14).
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh   # from anywhere; OUT defaults to /tmp/dynamo_gpu_check
#
# Stages, each with its own `timeout`, each run whatever happened before, all under a total
# deadline (GPU_CHECK_BUDGET_S, default 450 s: the whole script stays under 8 minutes):
#   0. setup: `pip install -e . --no-deps --no-build-isolation` only if `import dynamo_sampling` fails
#      outside the repository (no internet needed); nvidia-smi; versions; a one-kernel smoke test
#   1. GPU tests: every test whose name says gpu / cuda / nvrtc (tests/test_kernels.py's GPU tests and
#      its sample(backend="cuda") end-to-end tests, the CUDA co-occurrence lookup, any other suite's)
#   2. benchmarks/bench_kernels.py            -> $OUT/bench_kernels.json
#   3. benchmarks/bench_decode.py             -> $OUT/bench_decode.json
# Files written under $OUT (few, on purpose): summary.md (stage table, failures, the benchmark
# tables), gpu_tests.log, bench.log (setup, nvidia-smi, benchmark output), bench_kernels.json,
# bench_decode.json. Without a GPU every GPU stage is skipped cleanly and the exit code is 0;
# with one, the exit code is 1 when a stage failed. GPU_CHECK_DRY_RUN=1 on a machine without a GPU
# runs the GPU stages anyway (their tests skip, bench_decode runs --device cpu --smoke): the plumbing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/dynamo_gpu_check}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START=$(date +%s)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export DYNAMO_SAMPLING_CACHE="${DYNAMO_SAMPLING_CACHE:-$WORK/dynamo_cache}"  # stdlib statistics, built once
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-$WORK/cupy_cache}"
export PYTHONUNBUFFERED=1

SUMMARY="$OUT/summary.md"
TESTLOG="$OUT/gpu_tests.log"
BENCHLOG="$OUT/bench.log"
: >"$TESTLOG"
: >"$BENCHLOG"
STAGES=()
FAILED=0

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$BENCHLOG"; }

# run_stage NAME LIMIT_S LOGFILE CMD...: runs CMD under `timeout` (capped by the total deadline),
# appends its output to LOGFILE and records "name | status | seconds". With OPTIONAL=1 a failure does
# not make the script fail.
run_stage() {
    local name="$1" limit="$2" logfile="$3"
    shift 3
    local left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 15)); then
        STAGES+=("| $name | skipped: total budget of ${BUDGET}s spent | 0 |")
        log "$name: skipped (budget spent)"
        FAILED=1
        return
    fi
    ((limit > left)) && limit=$left
    log "$name: start (timeout ${limit}s)"
    echo "===== $name: $* (timeout ${limit}s)" >>"$logfile"
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" >>"$logfile" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0)) status
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    if ((rc != 0)); then
        if [[ "${OPTIONAL:-0}" == 1 ]]; then status="$status, optional"; else FAILED=1; fi
    fi
    STAGES+=("| $name | $status | $dt |")
    log "$name: $status in ${dt}s"
    return $rc
}

# ---------------------------------------------------------------- 0. setup
PY=""
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
    [[ -n "$cand" ]] && command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" >/dev/null 2>&1; then
        PY="$cand"; break  # a CUDA torch wins
    fi
    [[ -z "$PY" ]] && "$cand" -c "import torch" >/dev/null 2>&1 && PY="$cand"
done
if [[ -z "$PY" ]]; then
    log "no Python with torch found"
    echo "# gpu_check: no Python with torch found" >"$SUMMARY"
    exit 1
fi
log "python: $PY"

if ! (cd "$WORK" && "$PY" -c "import dynamo_sampling" >/dev/null 2>&1); then
    # optional: the tests and benchmarks import the package from the repository root anyway
    OPTIONAL=1 run_stage "pip install -e ." 90 "$BENCHLOG" \
        "$PY" -m pip install -e . --no-deps --no-build-isolation --no-index -q
else
    STAGES+=("| pip install -e . | not needed (importable) | 0 |")
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    echo "===== nvidia-smi" >>"$BENCHLOG"
    timeout 20 nvidia-smi >>"$BENCHLOG" 2>&1
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
        >"$WORK/gpu.csv" 2>&1
else
    echo "nvidia-smi: not found" >"$WORK/gpu.csv"
fi

cat >"$WORK/env_check.py" <<'EOF'
import importlib, json, sys
info = {"python": sys.version.split()[0]}
for mod in ("torch", "cupy", "numpy", "scipy", "safetensors", "tokenizers", "tqdm", "transformers", "pytest"):
    try:
        info[mod] = getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as e:
        info[mod] = f"MISSING ({type(e).__name__})"
import torch
from dynamo_sampling import kernels
info["torch.cuda"] = torch.version.cuda
info["cuda_available"] = torch.cuda.is_available()
info["fused_kernels_available"] = kernels.cuda_available()
info["compile_options"] = list(kernels.compile_options())
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name()
    if kernels.cuda_available():
        try:  # NVRTC through CuPy, argument packing, torch's stream: one call
            x = torch.randn(2, 3, 1000, device="cuda")
            probs, ids = kernels.topk_softmax(x, 5)
            ok = torch.equal(x.gather(-1, ids), x.topk(5, dim=-1).values)
            info["kernel_smoke"] = "ok" if ok else "WRONG VALUES"
        except Exception as e:
            info["kernel_smoke"] = f"FAILED: {type(e).__name__}: {e}"[:2000]
print(json.dumps(info, indent=1))
sys.exit(0 if not torch.cuda.is_available() or info.get("kernel_smoke") == "ok" else 1)
EOF
run_stage "environment + kernel smoke" 120 "$BENCHLOG" "$PY" "$WORK/env_check.py"
GPU=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && GPU=1
DECODE_ARGS=(--device cuda --repeats 2)
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 && $GPU == 0 ]]; then  # the plumbing on a CPU: GPU tests skip
    GPU=1
    DECODE_ARGS=(--device cpu --smoke)
    log "dry run: GPU stages on the CPU"
fi

# ---------------------------------------------------------------- 1-3. GPU stages
if ((GPU)); then
    run_stage "GPU tests (pytest -k 'gpu or cuda or nvrtc')" 210 "$TESTLOG" \
        "$PY" -m pytest -v --tb=short -p no:cacheprovider -rfE --durations=10 --continue-on-collection-errors \
        tests -k "gpu or cuda or nvrtc"
    run_stage "bench_kernels.py" 110 "$BENCHLOG" \
        "$PY" benchmarks/bench_kernels.py --repeats 30 --out "$OUT/bench_kernels.json"
    run_stage "bench_decode.py" 200 "$BENCHLOG" \
        "$PY" benchmarks/bench_decode.py "${DECODE_ARGS[@]}" --out "$OUT/bench_decode.json"
else
    for s in "GPU tests" "bench_kernels.py" "bench_decode.py"; do
        STAGES+=("| $s | skipped: no CUDA device | 0 |")
    done
    log "no CUDA device: GPU stages skipped"
fi

# ---------------------------------------------------------------- summary
{
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo
    echo "python: \`$PY\`; total $(($(date +%s) - START)) s of a ${BUDGET} s budget"
    echo
    echo '```'
    cat "$WORK/gpu.csv"
    echo '```'
    echo
    echo "| stage | status | seconds |"
    echo "| --- | --- | ---: |"
    printf '%s\n' "${STAGES[@]}"
    echo
    if grep -q "kernel_smoke\|fused_kernels_available" "$BENCHLOG"; then
        echo "## Environment"
        echo '```'
        sed -n '/===== environment/,/^}/p' "$BENCHLOG" | tail -n +2
        echo '```'
    fi
    if [[ -s "$TESTLOG" ]]; then
        echo "## GPU tests"
        echo '```'
        grep -v "^===== " "$TESTLOG" | grep -E "^(FAILED|ERROR)|passed|failed|error|no tests ran" | tail -40
        echo '```'
    fi
    if grep -q "^ H " "$BENCHLOG" 2>/dev/null || grep -q "speed-up" "$BENCHLOG"; then
        echo "## bench_kernels"
        echo '```'
        sed -n '/===== bench_kernels.py/,/^=====/p' "$BENCHLOG" | grep -v "^=====\|^\[gpu_check" | tail -60
        echo '```'
    fi
    if grep -q "^### " "$BENCHLOG"; then
        echo "## bench_decode"
        sed -n '/===== bench_decode.py/,$p' "$BENCHLOG" | sed -n '/^### /,$p' | grep -v "^\[gpu_check"
    fi
} >"$SUMMARY"
log "wrote $SUMMARY"
ls -l "$OUT" | tee -a "$BENCHLOG"
if ((GPU)); then exit $FAILED; fi
exit 0

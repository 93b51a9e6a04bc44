#!/usr/bin/env bash
# The GPU check: one command for whoever has an NVIDIA GPU machine (README, "GPU check").
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--model PATH] [--cuda 12|13]
#                        [--concurrency "1 8 32 64"] [--duration S]
#
# 1. stops at once, before installing anything, where no GPU is visible (exit 3);
# 2. installs the GPU serving requirements (onnxruntime-gpu as pinned for the image, plus TensorRT)
#    into a fresh virtual environment under the output folder;
# 3. builds the fp16 variant of the model (python -m flows.stages.variants);
# 4. per configuration (CUDA and TensorRT, fp32 and fp16) starts `python -m serving --device cuda`,
#    checks /ready and that GET /model reports the GPU provider, and runs the serving benchmark
#    (benchmarks/bench.py, this server only) at several concurrencies; TensorRT configurations are
#    first started once with an empty engine cache (the cold start: engine build included);
# 5. measures the host overhead (benchmarks/bench.py --null): the model's null twin served with the
#    CUDA defaults against decoding in-process on this machine's CPUs, which decide what a GPU
#    replica can serve;
# 6. writes OUT/gpu-check.md and OUT/gpu-check.json (img/s, p50/p99, time to ready cold and warm,
#    host overhead).
#
# Exit status: 0 every configuration ran on its provider, 1 a check failed, 2 usage, 3 no GPU here.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$REPO/build/gpu-check"
MODEL="$REPO/models/model.onnx"
CUDA_LINE=12
CONCURRENCY="1 8 32 64"
DURATION=10
DRY_RUN=0
PYTHON=${PYTHON:-python3}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-1200}  # a cold TensorRT start builds the engines

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT=$2; shift ;;
        --model) [ $# -ge 2 ] || die "--model needs a path"; MODEL=$2; shift ;;
        --cuda) [ $# -ge 2 ] || die "--cuda needs 12 or 13"; CUDA_LINE=$2; shift ;;
        --concurrency) [ $# -ge 2 ] || die "--concurrency needs levels"; CONCURRENCY=$2; shift ;;
        --duration) [ $# -ge 2 ] || die "--duration needs seconds"; DURATION=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
case "$CUDA_LINE" in
    12) GPU_REQUIREMENTS=requirements/serving-gpu.txt; TRT_REQUIREMENTS=requirements/tensorrt-cu12.txt ;;
    13) GPU_REQUIREMENTS=requirements/serving-gpu-cu13.txt; TRT_REQUIREMENTS= ;;
    *) die "--cuda $CUDA_LINE: expected 12 or 13" ;;
esac
VENV="$OUT/venv"
FP16="$OUT/models/fp16.onnx"

# label, model, provider GET /model must report, server flags (TensorRT caches go under OUT/trt-cache)
plan() {
    printf '%s\t%s\t%s\t%s\n' \
        cuda-fp32 "$MODEL" CUDAExecutionProvider "" \
        cuda-fp32-exhaustive "$MODEL" CUDAExecutionProvider "--cudnn-conv-algo-search EXHAUSTIVE" \
        cuda-fp16 "$FP16" CUDAExecutionProvider ""
    if [ -n "$TRT_REQUIREMENTS" ]; then
        printf '%s\t%s\t%s\t%s\n' \
            tensorrt-fp32 "$MODEL" TensorrtExecutionProvider "--tensorrt" \
            tensorrt-fp16 "$MODEL" TensorrtExecutionProvider "--tensorrt --trt-fp16"
    fi
}

print_plan() {
    echo "GPU check plan (output: $OUT)"
    echo "  1. check for a GPU: nvidia-smi -L (CUDA_VISIBLE_DEVICES respected); none: exit 3"
    echo "  2. fresh venv $VENV: pip install -r $GPU_REQUIREMENTS${TRT_REQUIREMENTS:+ -r $TRT_REQUIREMENTS}" \
         "+ onnx, psutil (requirements/constraints.txt)"
    echo "  3. fp16 variant: python -m flows.stages.variants $MODEL --precision fp16 --output $FP16"
    echo "  4. per configuration: python -m serving --device cuda [flags]; /ready; GET /model providers;"
    echo "     python -m benchmarks.bench --only b --concurrency $CONCURRENCY --duration $DURATION"
    echo "     (TensorRT: first one start with an empty engine cache, the cold time to ready)"
    plan | while IFS=$'\t' read -r label model provider flags; do
        echo "     - $label: $(basename "$model"), expects $provider, flags: ${flags:-(none)}"
    done
    echo "  5. host overhead: python -m benchmarks.bench --null --server-args \"--device cuda\"" \
         "--concurrency $CONCURRENCY --duration $DURATION (the null twin of $(basename "$MODEL"))"
    echo "  6. $OUT/gpu-check.md and $OUT/gpu-check.json (python -m benchmarks.gpu_report)"
}

gpu_count() {
    case "${CUDA_VISIBLE_DEVICES-unset}" in
        ""|-1) echo 0; return ;;
    esac
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [ "$DRY_RUN" = 1 ]; then
    print_plan
    exit 0
fi
GPUS=$(gpu_count)
if [ "$GPUS" -eq 0 ]; then
    echo "gpu_check: no GPU here (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES hides them): nothing installed," \
         "nothing run. Run it on a machine with an NVIDIA GPU and driver (--dry-run prints the plan)." >&2
    exit 3
fi
[ -f "$MODEL" ] || die "no model at $MODEL: make convert (scripts/convert_to_onnx.py) or pass --model"
MODEL="$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")"
mkdir -p "$OUT/logs" "$OUT/cold" "$OUT/bench" "$OUT/models"
OUT=$(cd "$OUT" && pwd)
VENV="$OUT/venv"
FP16="$OUT/models/fp16.onnx"
print_plan

rm -rf "$VENV" "$OUT/trt-cache"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1
  echo "CUDA line $CUDA_LINE, $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ)"; } > "$OUT/machine.txt"

echo "== installing into $VENV"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2046
"$PY" -m pip install --quiet -r "$REPO/$GPU_REQUIREMENTS" ${TRT_REQUIREMENTS:+-r "$REPO/$TRT_REQUIREMENTS"} \
    $(grep -E '^(onnx|psutil)==' "$REPO/requirements/constraints.txt")
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LIBS=$({ find "$SITE/nvidia" "$SITE/tensorrt_libs" -maxdepth 2 -type d \( -name lib -o -name tensorrt_libs \) \
       2>/dev/null || true; } | tr '\n' ':')  # the CUDA/cuDNN wheels' libraries and TensorRT's, where present
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
"$PY" -c 'import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'

echo "== fp16 variant"
if ! (cd "$REPO" && "$PY" -m flows.stages.variants "$MODEL" --precision fp16 --output "$FP16") \
        > "$OUT/logs/variants.log" 2>&1; then
    echo "gpu_check: the fp16 variant was not built (log: $OUT/logs/variants.log); its rows will fail" >&2
    tail -5 "$OUT/logs/variants.log" >&2 || true
fi

API_KEY="gpu-check-$RANDOM$RANDOM$RANDOM"
export API_KEY
SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -INT -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

# One start of the server: wait for /ready, keep GET /model in $1, stop it.
cold_start() {
    local out=$1 model=$2 port log
    shift 2
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    log="$OUT/logs/$(basename "$out" .json)-cold.log"
    (cd "$REPO" && exec setsid "$PY" -m serving --model "$model" --host 127.0.0.1 --port "$port" \
        --device cuda "$@") > "$log" 2>&1 &
    SERVER_PID=$!
    local waited=0
    until curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null || [ "$waited" -ge "$READY_TIMEOUT_S" ]; then
            echo "gpu_check: server not ready (log: $log)" >&2; tail -5 "$log" >&2 || true
            stop_server; return 1
        fi
        sleep 1; waited=$((waited + 1))
    done
    curl -fsS -H "X-API-Key: $API_KEY" "http://127.0.0.1:$port/model" > "$out"
    stop_server
}

plan > "$OUT/plan.tsv"
while IFS=$'\t' read -r -u 3 label model provider flags; do
    echo "== $label"
    read -r -a extra <<< "$flags"
    extra+=(--max-batch-size 32)
    if [ "$provider" = TensorrtExecutionProvider ]; then
        extra+=(--trt-cache-dir "$OUT/trt-cache/$label")
        cold_start "$OUT/cold/$label.json" "$model" "${extra[@]}" || continue
    fi
    # shellcheck disable=SC2086
    (cd "$REPO" && "$PY" -m benchmarks.bench --only b --model "$model" --server-args "--device cuda ${extra[*]}" \
        --concurrency $CONCURRENCY --duration "$DURATION" --json "$OUT/bench/$label.json") \
        > "$OUT/logs/$label-bench.log" 2>&1 || echo "gpu_check: $label: benchmark failed (log: $OUT/logs/$label-bench.log)" >&2
done 3< "$OUT/plan.tsv"

echo "== host overhead (null model)"
# shellcheck disable=SC2086
(cd "$REPO" && "$PY" -m benchmarks.bench --null --model "$MODEL" --server-args "--device cuda" \
    --concurrency $CONCURRENCY --duration "$DURATION" --json "$OUT/host-overhead.json") \
    > "$OUT/logs/host-overhead.log" 2>&1 || echo "gpu_check: host overhead: benchmark failed (log: $OUT/logs/host-overhead.log)" >&2

(cd "$REPO" && "$PY" -m benchmarks.gpu_report "$OUT")

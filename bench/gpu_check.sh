#!/usr/bin/env bash
# The prepared GPU check: one command on a machine with one CUDA GPU (H100/H200), about 5 minutes (4.8 on an H200
# before the speed step, which is new and not yet timed there; the step limits below add up to 14.5).
#   bash bench/gpu_check.sh OUTDIR
# Runs, each step under its own time limit, writing everything under OUTDIR (log, JSON, plots):
#   1. the device-aware kernel and model-path tests on CUDA (compiled Triton, no interpreter)
#   2. bench.kernels --device cuda --sweep (Triton vs torch eager / torch.compile, 7B shapes) and its plot
#   3. bench.search_cost --device cuda on the llama-7b and smollm2-135m shapes (random bf16 weights)
#   4. bench.speed --device cuda: dense vs 20%-pruned prefill/decode tokens/s (SmolLM2, tinyllama-1b shape, bf16)
#   5. the rest of the suite without the embedded-model tests: pytest -m "not smollm2"
# A failing step is reported and the next one runs; the exit status is the number of failed steps.
# Needs: this repo installed (pip install -e ".[test]") in a Python whose torch sees the GPU.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True HF_DATASETS_OFFLINE=1
python=${PYTHON:-python3}
failed=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo "=== $name (limit ${seconds}s): $*"
  local started=$SECONDS
  timeout "$seconds" "$@"
  local status=$?
  echo "=== $name: exit $status after $((SECONDS - started))s"
  [ "$status" -eq 0 ] || failed=$((failed + 1))
}

exec > >(tee "$out/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
device_tests=(tests/test_kernel_cached_gradient.py tests/test_kernel_channel_importance.py tests/test_kernel_gather.py tests/test_dispatch.py tests/test_device_path.py tests/test_prune.py)
step "kernel and device-path tests" 120 $python -m pytest -q -p no:cacheprovider "${device_tests[@]}"
step "bench.kernels" 150 $python -m bench.kernels --device cuda --sweep --out "$out/kernels-cuda.json"
step "plot" 30 $python -m bench.plot_kernels "$out/kernels-cuda.json" --out "$out/kernels-cuda.png"
step "search cost, llama-7b shape" 180 $python -m bench.search_cost --device cuda --shape llama-7b --pool-size 32 \
  --out "$out/search_cost-llama-7b-cuda.json"
step "search cost, smollm2-135m shape" 75 $python -m bench.search_cost --device cuda --shape smollm2-135m --pool-size 32 \
  --out "$out/search_cost-smollm2-135m-cuda.json"
step "speed: dense vs 20% pruned, transformers on the GPU" 150 $python -m bench.speed --device cuda --dtype bfloat16 \
  --shapes smollm2,tinyllama-1b --large-batches 1,8 --no-llama-cpp --out "$out/speed-cuda.json"
step "suite without smollm2" 180 $python -m pytest -q -p no:cacheprovider -m "not smollm2" "${device_tests[@]/#/--ignore=}"
echo "gpu_check: $failed step(s) failed"
exit "$failed"

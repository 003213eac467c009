#!/usr/bin/env bash
# Issue 5's GPU checks in one go: the CUDA tests, then the GPU benchmark. Needs a CUDA GPU and a CUDA build of torch
# in the Python that runs it (PYTHON=..., default: python on PATH).
#
#   bash benchmarks/run_gpu.sh            # tests, then the whole --preset gpu benchmark
#   bash benchmarks/run_gpu.sh tests      # only the GPU tests (pytest -m gpu) and the CPU kernel tests
#   bash benchmarks/run_gpu.sh targets    # only base / ntk-fused / lora-r8 at 2k-32k (the issue's targets; shorter)
#   bash benchmarks/run_gpu.sh bench      # only the whole --preset gpu benchmark
#
# Logs and results go to benchmarks/results/ (gpu_tests.log, ntk_speed_gpu*.json/png). Extra arguments after the
# stage go to bench_ntk_speed.py (e.g. `bash benchmarks/run_gpu.sh bench --steps 3`).
# The fused CUDA path passed these tests on an H200 (torch 2.11), so attention_backend="auto" uses it on CUDA
# (peft_ntk.ops.dispatch.CUDA_FUSED_PATH_VALIDATED; docs/fused_kernels.md). Rerun them after changing the CUDA adapters.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
stage=${1:-all}
[[ $# -gt 0 ]] && shift
results=benchmarks/results
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}); this script needs a GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"capability {torch.cuda.get_device_capability()}, flash available: "
      f"{torch.backends.cuda.is_flash_attention_available()}")
EOF

status=0
run_tests() {
    # -rs lists skips: on a GPU nothing in test_kernels_cuda.py may skip. A failure is reported at the end; the
    # benchmark still runs (its "path" column shows what served each variant).
    "$PYTHON" -m pytest -q -p no:cacheprovider -rs -m gpu tests/ 2>&1 | tee "$results/gpu_tests.log" || status=1
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fused_combine.py 2>&1 | tail -n 3 | tee -a "$results/gpu_tests.log" \
        || status=1
}

case "$stage" in
    tests) run_tests ;;
    targets)
        "$PYTHON" benchmarks/bench_ntk_speed.py --preset gpu --variants base ntk-fused lora-r8 \
            --lengths 2048 4096 8192 16384 32768 --out "$results/ntk_speed_gpu_targets.json" "$@" ;;
    bench) "$PYTHON" benchmarks/bench_ntk_speed.py --preset gpu "$@" ;;
    all)
        run_tests
        "$PYTHON" benchmarks/bench_ntk_speed.py --preset gpu "$@" ;;
    *) echo "unknown stage '$stage': use tests, targets, bench or all" >&2; exit 2 ;;
esac
[[ $status -eq 0 ]] || echo "some tests failed: see $results/gpu_tests.log" >&2
exit "$status"

#!/usr/bin/env bash
# The checks this project runs on a lent GPU machine (CI has none), in one call:
#   1. tests/test_cuda.py (skipped without CUDA) and the lift's tests, on the device;
#   2. the whole test suite on that machine's own torch (an older release than CI's 2.13: the
#      pyproject range's lower side), in parallel workers of one CPU thread each (12 workers of
#      16 threads each reached 16 % in 220 s on 2026-11-28);
#   3. one quick run of benchmarks/bench_cuda.py, its JSON into $OUT (docs/bench/bench_cuda.json).
# Usage (device tool): bash benchmarks/gpu_check.sh [STEP ...]   (default: 1 2 3) with OUT set;
# each step has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
STEPS=" ${*:-1 2 3} "
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
nvidia-smi -L
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), sys.version.split()[0])"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING
[[ $STEPS == *" 1 "* ]] && echo "== 1. CUDA tests $(date -u +%T)" &&
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/passes/test_lift.py \
    2>&1 | tee "$OUT/cuda_tests.log" | tail -25
[[ $STEPS == *" 2 "* ]] && echo "== 2. whole suite on this torch $(date -u +%T)" &&
OMP_NUM_THREADS=1 timeout 220 python3 -m pytest -q -p no:cacheprovider -n 14 \
    --ignore=tests/test_cuda.py 2>&1 | tee "$OUT/suite.log" | tail -40
[[ $STEPS == *" 3 "* ]] && echo "== 3. bench_cuda --quick $(date -u +%T)" &&
timeout 150 python3 benchmarks/bench_cuda.py --quick --json "$OUT/bench_cuda.json" 2>&1 \
    | tee "$OUT/bench_cuda.log" | tail -40
echo "== done $(date -u +%T)"

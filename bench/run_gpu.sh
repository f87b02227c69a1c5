#!/usr/bin/env bash
# One batched GPU session: GPU-marked tests (bf16, real compiler) + every microbenchmark.
# Usage on the GPU machine (repo root):  bash bench/run_gpu.sh OUTDIR ["bench names"] [test-seconds per test step]
# Needs the gguf wheel in .whl/ when the machine lacks the gguf package. The machine's copy of the tree has no
# .git: pass VLM_GIT_SHA=<sha> so the CSV rows say which commit they measured.
set -uo pipefail
OUT=${1:-bench/results}; mkdir -p "$OUT/results"
if ! python3 -c "import gguf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/results/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/results/device.txt"
t0=$(date +%s)
run() { local name=$1 lim=$2; shift 2; echo "=== $name (limit ${lim}s)"; s=$(date +%s)
        timeout "$lim" "$@" >"$OUT/results/$name.log" 2>&1; rc=$?
        echo "=== $name rc=$rc $(( $(date +%s) - s ))s"; tail -n 25 "$OUT/results/$name.log"; }
BENCHES=${2:-qmatmul attention patch_embed norm_rope dequant audio}
TEST_S=${3:-240}
# GPU tests: with pytest-xdist (on the GPU image) every GPU-marked test in one step on PYTEST_WORKERS processes
# (compiles are CPU-bound: ~1-2 s each); without it qmatmul's tests first on their own limit, then the rest.
if [ "$TEST_S" -gt 0 ]; then
  if python3 -c "import xdist" 2>/dev/null; then
    tmo=(); python3 -c "import pytest_timeout" 2>/dev/null && tmo=(--timeout 120)   # one hung test is not all
    # torch threads per worker: 14 workers x all cores starved the CPU-side quantizers (tests timed out)
    W=${PYTEST_WORKERS:-8}; export OMP_NUM_THREADS=$(( $(nproc) / W > 0 ? $(nproc) / W : 1 ))
    # GPU_TESTS: test paths (word-split; default every test), GPU_TESTS_K: a -k expression
    run gpu_tests "$TEST_S" python3 -m pytest -v --durations=25 -m gpu ${GPU_TESTS:-tests} ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} -n "$W" --dist loadgroup \
        -p no:cacheprovider -rfE --continue-on-collection-errors "${tmo[@]}"
    unset OMP_NUM_THREADS
  else
    run gpu_tests_qmatmul "$TEST_S" python3 -m pytest -q -m gpu tests/kernels/test_qmatmul_gpu.py -p no:cacheprovider -rfE
    run gpu_tests "$TEST_S" python3 -m pytest -q -m gpu tests --ignore=tests/kernels/test_qmatmul_gpu.py -p no:cacheprovider \
        -rfE --continue-on-collection-errors
  fi
fi
# Optional qmatmul tuning first (QMM_TUNE_S=seconds): winners JSON for this GPU, used by the qmatmul bench.
if [ -n "${QMM_TUNE_S:-}" ]; then
  gpu=$(python3 -c "import torch,re; print(re.sub(r'[^a-z0-9]+','_',torch.cuda.get_device_name().lower()).strip('_'))")
  export VLM_QMATMUL_CONFIGS="$OUT/results/qmatmul_$gpu.json"
  [ -f "vlm_kernels/configs/qmatmul_$gpu.json" ] && cp "vlm_kernels/configs/qmatmul_$gpu.json" "$VLM_QMATMUL_CONFIGS"
  run qmatmul_tune $(( QMM_TUNE_S + 15 )) python3 bench/bench_qmatmul.py --tune --quick --types "${QMM_TUNE_TYPES:-Q4_0,Q4_K}" \
      --tune-ms "${QMM_TUNE_MS:-1,4,16}" --tune-buckets "${QMM_TUNE_BUCKETS:-}" --budget-s "$QMM_TUNE_S" --tune-out "$VLM_QMATMUL_CONFIGS"
  [ -f "$VLM_QMATMUL_CONFIGS" ] || unset VLM_QMATMUL_CONFIGS
fi
for b in $BENCHES; do
  lim=${b#*:}; b=${b%%:*}; [ "$lim" = "$b" ] && lim=120
  args_var="ARGS_$b"; args=${!args_var:-}
  [ -f bench/bench_$b.py ] && run bench_$b "$lim" python3 bench/bench_$b.py --out "$OUT/results" $args
done
echo "total $(( $(date +%s) - t0 ))s"
tar -czf "$OUT/results.tar.gz" -C "$OUT" results

#!/bin/bash
# Every case of tests/triton on a CUDA machine, one pytest-xdist worker per CPU core spread over the
# visible GPUs: each feature combination compiles its own kernels (~2,900 forward variants in the full
# matrix, and the backward's), so CPU cores, not the GPU, set the pace. Run from the repository root.
# Log: $OUT/full_matrix.log (default benchmarks/results/full_matrix.log).
set -o pipefail
ln -sfn ../kernels mfa_hf/kernels; ln -sfn ../integrations mfa_hf/integrations  # a source checkout, not installed
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# Count the cores before OMP_NUM_THREADS=1 is exported: GNU nproc honours that variable (a first run on a
# 64-core machine got `-n 1` that way and finished 4% of the matrix in 3 x 560 s).
WORKERS=${WORKERS:-$(python -c "import os; print(len(os.sched_getaffinity(0)))")}
echo "pytest-xdist workers: $WORKERS"
export OMP_NUM_THREADS=1 MFA_TRITON_FULL=1  # float64 references on the CPU: one thread per worker
LOG=${OUT:-benchmarks/results}/full_matrix.log
START=$(date +%s)
timeout ${LIMIT_S:-3600} python -m pytest tests/triton -v -n "$WORKERS" -p no:cacheprovider \
    --durations=10 "$@" > "$LOG" 2>&1
RC=$?
echo "pytest exit $RC after $(( $(date +%s) - START )) s"
grep -c " PASSED" "$LOG" | sed 's/^/passed lines: /'
grep -E " FAILED| ERROR" "$LOG" | head -40
tail -25 "$LOG"
exit $RC

#!/bin/bash
# One measurement call on a single-GPU CUDA machine (the H100 for the tables), ~7 minutes:
#   1. host cost per call of each layer of our path (host_overhead.py), and the forward timed
#      synchronized vs queued, ours and SDPA-flash side by side;
#   2. the cuda suite (forward and forward+backward TFLOP/s: ours, SDPA flash, SDPA cuDNN, FlexAttention);
#   3. the decode table (bf16 and every quantized format at 4k/16k/64k, api time with tensor and int
#      lengths), with the backend's default launch configs.
# Run from the repository root. Logs land in $OUT (default benchmarks/results). The full correctness
# matrix is a separate call: benchmarks/triton/full_matrix.sh.
set -x
ln -sfn ../kernels mfa_hf/kernels; ln -sfn ../integrations mfa_hf/integrations  # a source checkout
export PYTHONPATH=. PYTHONUNBUFFERED=1
export MFA_BACKEND=${MFA_BACKEND:-triton}  # the kernels themselves: routing to SDPA off (issue 19's rule)
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout ${HOST_S:-120} python benchmarks/triton/host_overhead.py 2>&1 | tee "$OUT/host_overhead.log"
timeout ${SUITE_S:-300} python -m mfa_hf.benchmark --suite cuda --full-size --device cuda 2>&1 | tee "$OUT/cuda_suite.log"
DECODE_SWEEP=0 timeout ${DECODE_S:-150} python benchmarks/triton/device_bench.py decode --out "$OUT" 2>&1 \
    | tee "$OUT/decode.log" | grep -v "^  "

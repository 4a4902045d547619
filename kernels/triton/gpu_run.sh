#!/bin/bash
# One device call: decode/recompile tests on the GPU, then the decode variants benchmark (device_bench variants).
set -x
ln -sfn ../kernels mfa_hf/kernels; ln -sfn ../integrations mfa_hf/integrations
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
N=""; python -c "import xdist" 2>/dev/null && N="-n 8"
MFA_TRITON_FULL=1 timeout ${TEST_S:-200} python -m pytest tests/triton -q $N -k "decode or recompile" 2>&1 | tail -25
PYTHONPATH=. timeout ${BENCH_S:-360} python -m mfa_hf.kernels.triton.device_bench variants --out $OUT 2>&1 | tee $OUT/bench.log | grep -v "^  .*64k" | tail -60
grep "64k" $OUT/bench.log

#!/bin/bash
# The H200 tables of issue 19 on a single-GPU CUDA machine, step by step; STEPS picks the steps (default: all,
# ~20 minutes, more than one device call allows: split it, e.g. STEPS="tests host decode" then
# STEPS="suite flex e2e", back to back on the same machine):
#   tests   tests/triton on the GPU (the default matrix, one xdist worker per 2 cores: compiling sets the pace);
#   routes  the native routes' semantics on cuda, a decode step in a CUDA graph, host µs of a decode layer
#           (native_route_check.py);
#   host    host cost per call of each layer of our path (host_overhead.py), and the forward timed
#           synchronized vs queued, ours and SDPA-flash side by side; then the functions behind it (host_profile.py);
#   suite   the cuda suite (forward and forward+backward TFLOP/s: ours, SDPA flash, SDPA cuDNN, FlexAttention);
#   profile one forward+backward kernel by kernel, ours and SDPA-flash side by side (backward_profile.py);
#   decode  the decode table (bf16 and every quantized format at 4k/16k/64k, api time with tensor and int
#           lengths), with the backend's default launch configs;
#   flex    sliding-window and softcap problems against compiled FlexAttention (flex_features.py);
#   visit   decode steps at new key lengths (decode_first_visit.py: sdpa, sdpa without cuDNN, mps_flash);
#   e2e     Llama-3.2-1B-shaped model end to end: sdpa, mps_flash, MFAQuantizedCache, and transformers' own
#           quanto/hqq caches when .whl/ carries them (the device README's way: carry .whl).
# Run from the repository root. Logs land in $OUT (default benchmarks/results). The full correctness
# matrix is a separate call: benchmarks/triton/full_matrix.sh.
set -x
ln -sfn ../kernels mfa_hf/kernels; ln -sfn ../integrations mfa_hf/integrations  # a source checkout
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-tests routes host suite profile decode flex visit e2e}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
step() {  # whether step $1 runs; when it does, the seconds since the start go to stdout (plans the next split)
    [[ " $STEPS " == *" $1 "* ]] && echo "# step $1 at ${SECONDS}s"
}
kernels() { MFA_BACKEND=${MFA_BACKEND:-triton} "$@"; }  # the kernels themselves: routing to SDPA off (issue 19)
WORKERS=$(( $(python -c "import os; print(len(os.sched_getaffinity(0)))") / 2 ))
if step tests; then
    # -v into the log: each result line names its test, so failures stay named when the timeout cuts the summary
    # (2026-12-05: two F, names lost). The timeout interrupts (SIGINT) rather than terminates, so pytest still prints
    # its summary with each failure's reason (2026-12-06: twelve failures, reasons lost). The interpreter cases run
    # the CPU interpreter, not this GPU's kernels.
    OMP_NUM_THREADS=1 timeout -s INT -k 20 ${TESTS_S:-240} python -m pytest -v -rf -p no:cacheprovider -n "$WORKERS" tests/triton \
        -k "not interpreter" > "$OUT/gpu_tests.log" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -30
fi
if step routes; then
    timeout ${ROUTES_S:-120} python benchmarks/triton/native_route_check.py 2>&1 | tee "$OUT/native_route_check.log"
fi
if step host; then
    kernels timeout ${HOST_S:-120} python benchmarks/triton/host_overhead.py 2>&1 | tee "$OUT/host_overhead.log"
    kernels timeout ${HOST_PROFILE_S:-60} python benchmarks/triton/host_profile.py 2>&1 | tee "$OUT/host_profile.log"
fi
if step suite; then
    kernels timeout ${SUITE_S:-300} python -m mfa_hf.benchmark --suite cuda --full-size --device cuda 2>&1 \
        | tee "$OUT/cuda_suite.log"
fi
if step profile; then
    kernels timeout ${PROFILE_S:-90} python benchmarks/triton/backward_profile.py 2>&1 | tee "$OUT/backward_profile.log"
fi
if step decode; then
    kernels env DECODE_SWEEP=0 timeout ${DECODE_S:-150} python benchmarks/triton/device_bench.py decode --out "$OUT" \
        2>&1 | tee "$OUT/decode.log" | grep -v "^  "
fi
if step flex; then
    kernels timeout ${FLEX_S:-150} python benchmarks/triton/flex_features.py --out "$OUT" 2>&1 | tee "$OUT/flex.log"
fi
# The repository root must not be on the path for the transformers steps: with it, transformers 5.17 on the H200
# image failed to import LlamaConfig (2026-12-05; the root's kernels/ shadows PyPI's `kernels`, which transformers
# imports). A folder holding only the package stands in for it; quanto/hqq join it when .whl/ carries them.
model_path() {
    site=/tmp/mfa-e2e-path; mkdir -p $site && ln -sfn "$PWD/mfa_hf" $site/mfa_hf
    if ls .whl/*.whl >/dev/null 2>&1; then  # quanto/hqq for transformers' quantized caches
        python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && site=$site:/tmp/site
    fi
    echo $site
}
if step visit; then
    # decode steps at key lengths seen for the first time vs again, each variant in its own process
    site=$(model_path); root=$PWD
    for variant in "sdpa" "sdpa --no-cudnn" "mps_flash"; do
        (cd /tmp && PYTHONPATH=$site timeout ${VISIT_S:-60} python "$root/benchmarks/triton/decode_first_visit.py" \
            $variant) 2>&1 | grep -v -i warn | tee -a "$OUT/first_visit.log"
    done
fi
if step e2e; then
    site=$(model_path)
    # Routing on (the user's default): end to end measures what a user gets. 450 s: on a cold H100 (session 27) the
    # first of its 14 rows' compiles and prefills took 240 s for 7 rows; give it a device call of its own.
    (root=$PWD; cd /tmp && PYTHONPATH=$site timeout ${E2E_S:-450} python "$root/benchmarks/e2e_generate.py" \
        --device cuda --shape llama-1b --dtype bfloat16 --context 8192 --new 128 --contexts 32768) 2>&1 \
        | tee "$OUT/e2e.log"
fi
echo "# done at ${SECONDS}s"

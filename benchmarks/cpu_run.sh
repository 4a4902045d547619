#!/bin/bash
# The CPU tables of issue 19 in one run (~70 minutes on a 2-core host), each beside the stock path in the same
# process or the same run; STEPS picks the steps (default: all):
#   kernels   the kernel suite against SDPA (python -m mfa_hf.benchmark --suite quick --device cpu);
#   decode    one decode call per KV format at 4k/16k/64k against SDPA (--suite decode);
#   e2e       smollm-135m end to end (sdpa, mps_flash, MFAQuantizedCache int8/nf4, and transformers'
#             quanto/hqq caches where optimum-quanto / hqq are installed) at 1k and 8k context, 3 rounds, then
#             sdpa, int8, nf4 and transformers' caches at 16k, one round (cpu-e2e-16k.log), and sdpa and int8 at
#             32k, one round (cpu-e2e-32k.log: each row prefills 32k tokens, minutes on CPU);
#   alternate the decode paths alternating in one process (cpu_alternating_decode.py; the e2e rows run one process
#             each, and processes on this host spread more than the paths differ): sdpa, mps_flash, our int8 and nf4
#             caches and transformers' hqq 8-bit / quanto 4-bit caches after an 8k prompt (cpu-alternate-8k.log);
#             sdpa and int8 after a 32k prompt (cpu-alternate-32k.log);
#   diffusers a UNet and a Flux transformer, default processors against ours, 7 alternating rounds (DIFFUSERS_ROUNDS;
#             3 left the two medians within each other's spread on this host).
# Run from the repository root, on an otherwise idle machine (the rows are ratios of medians; a busy host
# spreads them). Logs land in $OUT (default benchmarks/results), named cpu-<step>.log.
set -o pipefail
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-kernels decode e2e alternate diffusers}
PYTHON=${PYTHON:-python}
step() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
header() {
    echo "# command: $*"
    echo "# $(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), main at" \
         "$(git rev-parse --short HEAD 2>/dev/null)"
    "$PYTHON" -c "import torch, transformers; print('# torch', torch.__version__, 'transformers', transformers.__version__)"
}
run() {  # run <log name> <command...>: the command's output, under a header, into $OUT/cpu-<name>.log
    local log="$OUT/cpu-$1.log"; shift
    { header "$@"; "$@"; } 2>&1 | tee "$log"
}
step kernels && run kernels "$PYTHON" -m mfa_hf.benchmark --suite quick --device cpu
step decode && run decode "$PYTHON" -m mfa_hf.benchmark --suite decode --device cpu
step e2e && run e2e "$PYTHON" benchmarks/e2e_generate.py --device cpu --shape smollm-135m --dtype float32 \
    --context 1024 --new 32 --contexts 8192 --context-caches int8 nf4 hf_hqq hf_quanto --skip fp8_e4m3 --repeats 3
step e2e && run e2e-16k "$PYTHON" benchmarks/e2e_generate.py --device cpu --shape smollm-135m --dtype float32 \
    --new 32 --no-main-rows --contexts 16384 --context-caches int8 nf4 hf_hqq hf_quanto --repeats 1
step e2e && run e2e-32k "$PYTHON" benchmarks/e2e_generate.py --device cpu --shape smollm-135m --dtype float32 \
    --new 32 --no-main-rows --contexts 32768 --context-caches int8 --repeats 1
step alternate && run alternate-8k "$PYTHON" benchmarks/cpu_alternating_decode.py --context 8192 --tokens 16 \
    --rounds 6 --paths mps_flash mps_flash:int8 mps_flash:nf4 sdpa:hf_hqq sdpa:hf_quanto
step alternate && run alternate-32k "$PYTHON" benchmarks/cpu_alternating_decode.py --context 32768 --tokens 8 \
    --rounds 4 --paths mps_flash:int8
step diffusers && run diffusers "$PYTHON" -m mfa_hf.benchmark --suite diffusers --device cpu --rounds ${DIFFUSERS_ROUNDS:-7}
exit 0

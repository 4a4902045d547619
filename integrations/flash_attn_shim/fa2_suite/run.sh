#!/usr/bin/env bash
# FlashAttention-2's own tests/test_flash_attn.py against mfa-hf's flash_attn shim (fa2.py --help: every option).
#   run.sh prepare              here (FA2 git mirror or network): tests + einops wheel into .fa2_tests/ (ignored)
#   run.sh collect              count the cases (works on CPU)
#   run.sh smoke                CPU smoke run of a few small cases of every test function (MFA_BACKEND=torch)
#   run.sh run [OPTIONS]        on a CUDA machine, one process: --every N --offset K --budget S --match RE -- PYTEST_ARGS
#   run.sh gpu K [OPTIONS]      the same in K processes side by side on one GPU, then one merged summary
# On a machine without the FA2 history or the network, carry .fa2_tests (made by prepare) along.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if ! (cd / && "$python" -c "import mfa_hf.kernels, mfa_hf.integrations.flash_attn_shim") 2>/dev/null; then
  # A source checkout, not installed: the package maps kernels/ and integrations/ under mfa_hf.
  ln -sfn ../kernels "$repo/mfa_hf/kernels"
  ln -sfn ../integrations "$repo/mfa_hf/integrations"
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
command="${1:-run}"
shift || true
case "$command" in
  smoke)
    exec "$python" "$here/fa2.py" run --cpu --smoke "$@" ;;
  gpu)
    shards="${1:?run.sh gpu K [fa2.py run options]}"
    shift
    work="$repo/.fa2_tests/gpu"
    mkdir -p "$work"
    rm -f "$work"/report-*.json "$work"/shard-*.log
    for ((i = 0; i < shards; i++)); do
      "$python" "$here/fa2.py" run --shard "$i/$shards" --report "$work/report-$i.json" "$@" >"$work/shard-$i.log" 2>&1 &
    done
    wait
    tail -n 2 "$work"/shard-*.log
    exec "$python" "$here/fa2.py" merge "$work"/report-*.json --report "${OUT:-$repo/.fa2_tests}/fa2_report.json" ;;
  *)
    exec "$python" "$here/fa2.py" "$command" "$@" ;;
esac

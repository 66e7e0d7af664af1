#!/usr/bin/env bash
# One-shot GPU check (issue #8): on a CUDA machine, build a ~1B Llama config and report bf16 training
# MFU against the measured bf16 matmul peak, and decode tokens/s against the memory-bandwidth
# roofline, in under 5 minutes (a hard 300 s timeout by default).
#
#   bash benchmarks/gpu_check.sh                  # CUDA, ~1B config
#   bash benchmarks/gpu_check.sh --dry-run        # print the plan and the config, run nothing
#   bash benchmarks/gpu_check.sh --device cpu     # tiny config on CPU: checks the script itself
#   bash benchmarks/gpu_check.sh --help           # every option (see benchmarks/gpu_check.py)
#
# GPU_CHECK_TIMEOUT (seconds, default 300) bounds the whole run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="${here}/..${PYTHONPATH:+:${PYTHONPATH}}"
exec timeout "${GPU_CHECK_TIMEOUT:-300}" "${PYTHON:-python}" "${here}/gpu_check.py" "$@"

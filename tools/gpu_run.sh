#!/usr/bin/env bash
# The GPU-machine run: pytest -m gpu and bench gpu, logs to $OUT. Wheels staged in /tmp/site (stage-wheels),
# the model and video carried in .devcache (DELTAYOLO_CACHE).
set -uo pipefail
export PYTHONPATH=/tmp/site:.:${PYTHONPATH:-} DELTAYOLO_CACHE=$PWD/.devcache ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/test_gpu_path.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
for args in "${@:-16}"; do :; done
python3 -m daemon.cli bench gpu --cameras "${CAMERAS:-16}" --batch "${BATCH:-16}" --seconds "${SECONDS_PER_RUN:-8}" \
  --json "$OUT/bench_gpu.json" 2>&1 | grep -v " INFO " | tee "$OUT/bench_gpu.log"

#!/usr/bin/env bash
# The GPU-machine run: pytest -m gpu and bench gpu, logs to $OUT. Wheels staged in /tmp/site (stage-wheels),
# the model, video and onnxconverter-common wheel carried in .devcache (DELTAYOLO_CACHE).
set -uo pipefail
export PYTHONPATH=/tmp/site:.:${PYTHONPATH:-} DELTAYOLO_CACHE=$PWD/.devcache ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devcache/*.whl 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$OUT/gpu.txt"
[ "${SKIP_TESTS:-0}" = 1 ] || python3 -m pytest -q -m gpu tests/test_gpu_path.py -p no:cacheprovider 2>&1 | grep -v 'nvjpeg2k\|nvtiff' | tee "$OUT/pytest_gpu.log"
for prec in ${PRECISIONS:-fp16}; do
  python3 -m daemon.cli bench gpu --cameras "${CAMERAS:-16}" --batch "${BATCH:-16}" --seconds "${SECONDS_PER_RUN:-8}" \
    --precision "$prec" --json "$OUT/bench_gpu_$prec.json" 2>&1 | grep -v " INFO \|nvjpeg2k\|nvtiff\|nvJPEG2000\|nvTIFF" \
    | tee "$OUT/bench_gpu_$prec.log"
done

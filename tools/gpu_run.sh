#!/usr/bin/env bash
# The GPU-machine run for issue 3: GPU tests, then `bench gpu` (daemon.gpu.bench: (a), (b), ceilings, and (c) the
# daemon runtime per installed decoder, with --delta also with delta caching), logs and JSON to $OUT.
#
# Needs: the wheels of ../shared/gpu/stage-wheels installed in /tmp/site (this script installs them itself when
# the staged parts are complete in /tmp/gw), and .devcache carried (model, vtest, photos, onnxconverter-common).
# Knobs (env): CAMERAS (16) BATCH (32) DEPTH (4) SECONDS_PER_RUN (3) WARMUP (1) SIZES (native,1280x960)
#   PRECISION (fp16) DECODERS (auto) DELTA (--delta) TESTS (the gpu-marked tests) SKIP_TESTS=1 SKIP_BENCH=1
set -uo pipefail
export PYTHONPATH=/tmp/site:.:${PYTHONPATH:-} DELTAYOLO_CACHE=$PWD/.devcache ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -d /tmp/site/nvidia/dali ] && ls /tmp/gw/part_* >/dev/null 2>&1; then
  cat /tmp/gw/part_* | tar xf - -C /tmp/gw && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site /tmp/gw/*.whl && echo "installed staged wheels"
fi
[ -d /tmp/site ] || { echo "no /tmp/site: stage the wheels first (../shared/gpu/stage-wheels)"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcache/*.whl 2>/dev/null
# PyAV is not on the GPU machine; the NVDEC tests that encode with it need its wheel carried in .avwhl (made here with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .avwhl av==18.1.0`)
ls .avwhl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .avwhl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv | tee "$OUT/gpu.txt"
python3 -c "from daemon.gpu.capabilities import detect; c = detect('auto'); print(c.backend, '|', c.reason, '|', c.notes)" \
  2>&1 | grep -v 'nvjpeg2k\|nvtiff\|nvJPEG2000\|nvTIFF' | tee -a "$OUT/gpu.txt"
filter='nvjpeg2k\|nvtiff\|nvJPEG2000\|nvTIFF\|Note: If using'
if [ "${SKIP_TESTS:-0}" != 1 ]; then  # each test in its own process: a crash in one cannot hide the others
  for id in $(python3 -m pytest -q -p no:cacheprovider --collect-only -m gpu ${TESTS:-tests/test_gpu_path.py} \
              2>/dev/null | grep '::'); do
    timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider -rfE "$id" 2>&1 | grep -v "$filter" \
      | grep -E "passed|failed|skipped|error|Error|assert|^E " | head -n 12 | sed "s|^|$id: |" | tee -a "$OUT/pytest_gpu.log"
  done
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 -m daemon.gpu.bench --cameras "${CAMERAS:-16}" --batch "${BATCH:-32}" \
    --depth "${DEPTH:-4}" --seconds "${SECONDS_PER_RUN:-3}" --warmup "${WARMUP:-1}" --sizes "${SIZES:-native,1280x960}" \
    --precision "${PRECISION:-fp16}" --decoders "${DECODERS:-auto}" ${DELTA---delta} --json "$OUT/bench_gpu.json" \
    2> >(grep -v "$filter" > "$OUT/bench_gpu.err") | tee "$OUT/bench_gpu.log"
  tail -n 20 "$OUT/bench_gpu.err"
fi

#!/usr/bin/env bash
# Throughput tuning on the device machine (tools/gpu_tune.py), with the staged wheels installed in /tmp/site.
# STEP=tune: ceilings + runtime variants (VARIANTS, CEILINGS, DECODE_CEILINGS); STEP=profile: py-spy (GIL holders
# and every thread) over one variant (PROFILE_VARIANT).
set -uo pipefail
export PYTHONPATH=/tmp/site:.:${PYTHONPATH:-} DELTAYOLO_CACHE=$PWD/.devcache ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcache/*.whl 2>/dev/null
F='nvjpeg2k\|nvtiff\|nvJPEG2000\|nvTIFF\|Note: If using'
if [ "${STEP:-tune}" = tune ]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/env.txt"
  [ -n "${PLACEMENT:-}" ] && timeout 120 python3 tools/gpu_tune.py --placement --variants "" 2>&1 \
    | grep -i "placed on\|CPUExecutionProvider\]\|Node(s)" | head -n 40 | tee "$OUT/placement.txt"
  timeout "${TUNE_TIMEOUT:-420}" python3 tools/gpu_tune.py --ceilings "${CEILINGS:-32,64}" \
    --decode-ceilings "${DECODE_CEILINGS-auto,hw,hybrid}" --variants "$VARIANTS" --seconds "${SECONDS_PER_RUN:-5}" \
    2>&1 | grep -v "$F" | tee "$OUT/tune.txt" | grep -v "^\[\|WARNING\|warn"
else
  S=/tmp/site/bin/py-spy  # attach once the run is measuring (imports, frames and the engine build come first)
  for mode in gil threads; do
    python3 tools/gpu_tune.py --variants "$PROFILE_VARIANT" --seconds 12 --warmup 2 > "$OUT/profiled_$mode.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do grep -q "engine ready\|ready on GPU" "$OUT/profiled_$mode.log" 2>/dev/null && break; sleep 0.5; done
    sleep 5
    timeout 30 $S record --$mode -r 250 -d 8 --pid $pid --format raw -o "$OUT/$mode.txt" 2>&1 | tail -n 2
    wait $pid; grep "frames/s" "$OUT/profiled_$mode.log"
  done
fi
ls -la "$OUT"

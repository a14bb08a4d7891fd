#!/usr/bin/env bash
# The 2-GPU acceptance runs of issues #6 (camera state moved GPU0 -> GPU1) and #9 (cluster throughput 1 vs 2 GPUs).
#
# Run from the repository root on the 2-GPU machine, after ray[serve] and the GPU preset were staged into
# /tmp/site (tools/ray_wheels.txt says how):
#   PYTHONPATH=/tmp/site DELTAYOLO_CACHE=$PWD/.devcache bash tools/gpu_multi.sh
# Knobs (environment): CAMERAS (32) BATCH (32) GPUS ("1 2") STEP_SECONDS (15) WARMUP (8) FRAMES (240)
#   CPUS_PER_WORKER (8) DELTA (0: raw scaling; 1: delta caching on) MOVE_TIMEOUT (150) BENCH_TIMEOUT (300)
#   FAKE_GPUS (0; N: a CPU smoke run of the bench part with N fake GPU slots)
#   MOVES (8: graceful group moves timed in the "moves" part) MOVES_TIMEOUT (150)
#   PARTS ("env move bench moves"): which parts to run.
# Writes to $OUT (or ./out/gpu_multi): gpu_multi.log (everything), env.txt (versions, topology, peer access),
# move.json (#6 move check), bench_cluster.json (#9 throughput + cache copy timings), bench_moves.json (#9 group
# moves between the two GPUs with delta caching on, so camera states travel: each move timed, warm/cold counts).
# Every part runs even when an earlier one failed; the exit status is that of the first failure. Each part's
# timeout is capped by what is left of TOTAL_S (470 s), so the whole script ends within 8 minutes.
set -uo pipefail
OUT=${OUT:-$PWD/out/gpu_multi}
mkdir -p "$OUT"

export PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export MALLOC_MMAP_THRESHOLD_=536870912 MALLOC_TRIM_THRESHOLD_=1073741824
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # Ray's workers inherit it: the project and /tmp/site
export DELTAYOLO_CACHE=${DELTAYOLO_CACHE:-$PWD/.devcache}
CAMERAS=${CAMERAS:-32} BATCH=${BATCH:-32} GPUS=${GPUS:-"1 2"} STEP_S=${STEP_SECONDS:-15} WARMUP=${WARMUP:-8}
FRAMES=${FRAMES:-240} CPUS_PER_WORKER=${CPUS_PER_WORKER:-8} DELTA=${DELTA:-0} FAKE_GPUS=${FAKE_GPUS:-0}
MOVE_TIMEOUT=${MOVE_TIMEOUT:-150} BENCH_TIMEOUT=${BENCH_TIMEOUT:-300} PARTS=${PARTS:-"env move bench moves"}
MOVES=${MOVES:-8} MOVES_TIMEOUT=${MOVES_TIMEOUT:-150} TOTAL_S=${TOTAL_S:-470}
END=$(( $(date +%s) + TOTAL_S ))
status=0
left() { local t=$1 rest=$(( END - $(date +%s) - 40 )); (( rest < t )) && t=$rest; (( t < 5 )) && t=5; echo "$t"; }
note() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
fail() { echo "!!! $1 failed (rc $2)"; [[ $status -ne 0 ]] || status=$2; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

main() {
if want env; then
  note "env: machine, versions, topology"
  {
    date -u; uname -r; nproc
    nvidia-smi -L
    echo "--- nvidia-smi topo -m"; nvidia-smi topo -m
    echo "--- nvidia-smi"; nvidia-smi --query-gpu=index,name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
    echo "--- python"; python3 -V; which python3
    timeout 60 python3 - <<'EOF'
import importlib, importlib.metadata as md
for n in ["ray", "pydantic", "pydantic-core", "grpcio", "protobuf", "aiohttp", "typing-extensions", "packaging",
          "numpy", "cupy-cuda13x", "onnxruntime", "onnxruntime-gpu", "nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13",
          "paho-mqtt", "simplejpeg", "opencv-python-headless", "nvidia-ml-py"]:
    try:
        print(f"{n:28s} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"{n:28s} -")
for mod in ["ray", "ray.serve", "cupy", "onnxruntime", "nvidia.dali", "nvidia.nvimgcodec", "pydantic", "daemon.app",
            "cluster.worker"]:
    try:
        importlib.import_module(mod)
        print(f"import {mod}: ok")
    except Exception as exc:
        print(f"import {mod}: FAILED {type(exc).__name__}: {exc}")
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    print("cuda devices", n)
    for i in range(n):
        for j in range(n):
            if i != j:
                print(f"peer access {i}->{j}: {bool(cupy.cuda.runtime.deviceCanAccessPeer(i, j))}")
except Exception as exc:
    print(f"cupy: {type(exc).__name__}: {exc}")
import onnxruntime as ort
print("onnxruntime providers", ort.get_available_providers())
from cluster.topology import describe, islands_from_links, read_link_matrix
links = read_link_matrix()
print(describe(links) if links is not None else "NVML: no link matrix")
if links is not None:
    print("NVLink islands", islands_from_links(links))
EOF
  } 2>&1 | tee "$OUT/env.txt" || fail env $?
fi

if want move; then
  note "#6 move: state exported on GPU0, imported on GPU1 (peer copy vs host), next frames vs a camera that stayed"
  DELTAYOLO_MOVE_JSON="$OUT/move.json" timeout --signal=INT --kill-after=15 "$(left "$MOVE_TIMEOUT")" \
    python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_cluster_gpu.py -rs || fail move $?
fi

if want bench; then
  note "#9 bench cluster: GPUs $GPUS on the same $CAMERAS cameras, batch $BATCH, ${STEP_S} s per step"
  extra=(); [[ $DELTA == 1 ]] && extra+=(--delta); [[ $FAKE_GPUS != 0 ]] && extra+=(--fake-gpus "$FAKE_GPUS")
  timeout --signal=INT --kill-after=30 "$(left "$BENCH_TIMEOUT")" \
    python3 -m cluster.bench --cameras "$CAMERAS" --batch "$BATCH" --gpus $GPUS --seconds "$STEP_S" \
      --warmup "$WARMUP" --frames "$FRAMES" --num-cpus-per-worker "$CPUS_PER_WORKER" "${extra[@]}" \
      --json "$OUT/bench_cluster.json" || fail bench $?
fi

if want moves; then
  note "#9 cache moves: $MOVES graceful group moves between the 2 GPUs, delta caching on (camera states travel)"
  extra=(); [[ $FAKE_GPUS != 0 ]] && extra+=(--fake-gpus "$FAKE_GPUS")
  timeout --signal=INT --kill-after=30 "$(left "$MOVES_TIMEOUT")" \
    python3 -m cluster.bench --cameras 8 --group-size 2 --batch 8 --gpus 2 --seconds 5 --warmup 5 --frames 60 \
      --num-cpus-per-worker "$CPUS_PER_WORKER" --delta --moves "$MOVES" "${extra[@]}" \
      --json "$OUT/bench_moves.json" || fail moves $?
fi

note "done (status $status); files: $(ls "$OUT" | tr '\n' ' ')"
return "$status"
}

main 2>&1 | tee -a "$OUT/gpu_multi.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# Issue #9, overflow batches read over peer access: the 2-GPU runs, in one call of at most 8 minutes.
#
# Run from the repository root on the 2-GPU machine, with ray[serve] and the GPU preset staged into /tmp/site
# (tools/ray_wheels.txt says how):
#   PYTHONPATH=/tmp/site:. DELTAYOLO_CACHE=$PWD/.devcache OUT=$OUT bash tools/gpu_overflow.sh
# Parts (PARTS, default "env ipc state bench"), each with its own timeout, each run even when an earlier one failed:
#   env    versions, nvidia-smi topo -m, peer access both ways, what Ray's NOSET variable does to get_gpu_ids
#   ipc    tests/test_cluster_overflow_gpu.py::test_ipc_arrays_read_over_nvlink_in_another_process
#          (IPC handles exported on GPU 0, opened and read on GPU 1 in another process, equality, peer read vs host
#          route timed) -> $OUT/ipc.json
#   state  ...::test_borrowed_state_read_over_peer_access_equals_the_bytes_route (a GPU runtime's camera state lent
#          as IPC handles, materialized on GPU 1 by another process = the bytes route) -> $OUT/state.json
#   bench  ...::test_overflow_bench_two_gpus (2 workers on 2 GPUs through Ray Serve, the home overloaded; overflow
#          off vs on in the same run: frames served and the ratio, guest round trip, frames dropped) -> $OUT/bench.json
# Bench knobs: HOT_CAMERAS (16) HOT_FPS (120) BENCH_SECONDS (20) BENCH_WARMUP (10) BENCH_BATCH (32)
#   BENCH_ROUTES ("off auto host": overflow off, on with every GPU visible to both workers (auto: states as bytes
#   unless feature maps are lent), on with each worker seeing its own GPU only (host); a failing step still leaves
#   the others' figures) BENCH_TIMEOUT (330)
# The exit status is that of the first failing part. Each part's timeout is capped by what is left of TOTAL_S (460).
set -uo pipefail
OUT=${OUT:-$PWD/out/gpu_overflow}
mkdir -p "$OUT"

export PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export MALLOC_MMAP_THRESHOLD_=536870912 MALLOC_TRIM_THRESHOLD_=1073741824
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # Ray's workers inherit it: the project and /tmp/site
export DELTAYOLO_CACHE=${DELTAYOLO_CACHE:-$PWD/.devcache}
export DELTAYOLO_OVERFLOW_JSON="$OUT"
PARTS=${PARTS:-"env ipc state bench"} TOTAL_S=${TOTAL_S:-460} BENCH_TIMEOUT=${BENCH_TIMEOUT:-330}
export BENCH_ROUTES=${BENCH_ROUTES:-"off auto host"}
END=$(( $(date +%s) + TOTAL_S ))
status=0
left() { local t=$1 rest=$(( END - $(date +%s) - 20 )); (( rest < t )) && t=$rest; (( t < 5 )) && t=5; echo "$t"; }
note() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
fail() { echo "!!! $1 failed (rc $2)"; [[ $status -ne 0 ]] || status=$2; }
want() { [[ " $PARTS " == *" $1 "* ]]; }
T=tests/test_cluster_overflow_gpu.py
pyt() { python3 -m pytest -q -s -p no:cacheprovider -p no:warnings -m gpu -rs "$@"; }

main() {
if want env; then
  note "env: machine, versions, topology, peer access"
  {
    date -u; nproc; nvidia-smi -L
    echo "--- nvidia-smi topo -m"; nvidia-smi topo -m
    echo "--- python"; python3 -V
    timeout 90 python3 - <<'EOF'
import importlib.metadata as md
for n in ["ray", "cupy-cuda13x", "onnxruntime-gpu", "nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "numpy"]:
    try:
        print(f"{n:26s} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"{n:26s} -")
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
try:
    import os, ray
    ray.init(num_gpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    @ray.remote(num_gpus=1)
    def seen():
        return os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_gpu_ids()
    print("ray actor default:", ray.get([seen.remote() for _ in range(2)]))
    noset = seen.options(runtime_env={"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}})
    print("ray with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1:", ray.get([noset.remote() for _ in range(2)]))
    ray.shutdown()
except Exception as exc:
    print(f"ray: {type(exc).__name__}: {exc}")
EOF
  } 2>&1 | tee "$OUT/env.txt" || fail env $?
fi

if want ipc; then
  note "ipc: reference-sized arrays exported on GPU 0, read on GPU 1 in another process (peer vs host route)"
  timeout --signal=INT --kill-after=15 "$(left 90)" python3 -m pytest -q -s -p no:cacheprovider -p no:warnings -m gpu -rs "$T::test_ipc_arrays_read_over_nvlink_in_another_process" \
    || fail ipc $?
fi

if want state; then
  note "state: a GPU runtime's camera state lent as IPC handles, materialized on GPU 1 = the bytes route"
  timeout --signal=INT --kill-after=15 "$(left 150)" \
    python3 -m pytest -q -s -p no:cacheprovider -p no:warnings -m gpu -rs "$T::test_borrowed_state_read_over_peer_access_equals_the_bytes_route" || fail state $?
fi

if want bench; then
  note "bench: 2 workers on 2 GPUs, home overloaded; overflow off vs on ($BENCH_ROUTES)"
  timeout --signal=INT --kill-after=30 "$(left "$BENCH_TIMEOUT")" python3 -m pytest -q -s -p no:cacheprovider -p no:warnings -m gpu -rs "$T::test_overflow_bench_two_gpus" \
    || fail bench $?
fi

note "done (status $status); files: $(ls "$OUT" | tr '\n' ' ')"
return "$status"
}

main 2>&1 | tee -a "$OUT/gpu_overflow.log"
exit "${PIPESTATUS[0]}"

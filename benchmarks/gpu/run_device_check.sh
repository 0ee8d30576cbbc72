#!/usr/bin/env bash
# The device check in one command, on the GPU machine from the repository root (~6-8 minutes):
#   bash benchmarks/gpu/run_device_check.sh            # results in $OUT (default /tmp/device_check)
# The machine has no internet: put the peers' wheels in .whl/ first, on a machine that has
# (`bash benchmarks/gpu/fetch_wheels.sh`), and carry .whl along. Without them the check still
# runs; it then has no FLA row, and the experts take XLA's ragged_dot (logged).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
rm -f "$OUT/jax_compiled" "$OUT/fla_done"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
# XLA's GEMM autotuning would time GEMMs on the GPU while FLA autotunes beside it.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
SITE=/tmp/device_check_site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || echo "wheel install failed"
fi
python3 -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__)"
FLA_STATUS=absent
if PYTHONPATH="$SITE" python3 -c "import fla" 2>/dev/null; then
  FLA_STATUS=running
  # torch beside JAX: JAX takes at most 60% of the card.
  # `timeout` stops it with SIGTERM, which skips its own `finally`: mark it done here too.
  ( PYTHONPATH="$SITE" timeout 330 python3 benchmarks/gpu/fla_peer.py --force-backward --out "$OUT" \
      > "$OUT/fla.log" 2>&1; touch "$OUT/fla_done" ) &
else
  touch "$OUT/fla_done"
fi
# tokamax (the experts' grouped matmul) from the site folder, after the project's own paths.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 PYTHONPATH=".:$SITE" timeout 480 \
  python3 benchmarks/gpu/device_check.py --out "$OUT" > "$OUT/jax.log" 2>&1
echo "device_check exit $?"
touch "$OUT/jax_compiled"  # lets the peer time even if the check died before its compile ended
wait
echo "=== FLA ($FLA_STATUS)"; [ -f "$OUT/fla.log" ] && grep -v "^RESULT" "$OUT/fla.log" | tail -15
echo "=== failures"; grep -E "FAILED|Error" "$OUT/jax.log" | cut -c1-600 | tail -20
echo "=== results"; grep -h "^RESULT" "$OUT"/fla.log "$OUT/jax.log" 2>/dev/null | cut -c1-700

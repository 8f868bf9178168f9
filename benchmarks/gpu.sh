#!/usr/bin/env bash
# One GPU benchmark of the full-size preset at 800x800: forward, plain autograd gradient of one logit, LRP of
# 1 / 10 / 100 queries in one call, peak GPU memory (torch.cuda.max_memory_allocated), in float32 and in
# bfloat16 (autocast forward, relevance backward in its dtypes); each case in its own process. Writes
# docs/results/gpu.md (or $OUT). About 3-5 minutes on one recent GPU.
#
#   benchmarks/gpu.sh                                  # cuda, maskdino_r50_3s_coco, 800x800
#   DEVICE=cpu PRESET=tiny benchmarks/gpu.sh           # the same script in seconds on a CPU (a check of the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-maskdino_r50_3s_coco}
if [ "$PRESET" = tiny ] || [ "$PRESET" = demo ]; then SIZE=${SIZE:-96}; else SIZE=${SIZE:-800}; fi
KS=${KS:-"10 100"}
REPEAT=${REPEAT:-3}
OUT=${OUT:-docs/results/gpu.md}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

k_args=()
for k in $KS; do k_args+=(--k "$k"); done
start=$(date +%s)
for dtype in float32 bfloat16; do
  echo "== $PRESET at ${SIZE}x${SIZE} on $DEVICE, $dtype" >&2
  "$PYTHON" -m maskdino_lrp.bench --config "$PRESET" --size "$SIZE" --device "$DEVICE" --dtype "$dtype" \
    "${k_args[@]}" --repeat "$REPEAT" --threads "${THREADS:-2}" --json "$TMP/$dtype.json" > "$TMP/$dtype.md"
  cat "$TMP/$dtype.md"
done
seconds=$(( $(date +%s) - start ))

device_name=$("$PYTHON" -c "import torch, sys; d = sys.argv[1]; print(torch.cuda.get_device_name(torch.device(d)) if d.startswith('cuda') else 'CPU (' + str(torch.get_num_threads()) + ' threads)')" "$DEVICE")
{
  echo "# GPU benchmark: what explaining costs next to a forward and a plain gradient"
  echo
  echo "Written by \`benchmarks/gpu.sh\` on $(date -u +%Y-%m-%d) — device: $device_name, torch $("$PYTHON" -c 'import torch; print(torch.__version__)'),"
  echo "preset \`$PRESET\` (random weights) at ${SIZE}×${SIZE}; each case in its own process, best of $REPEAT"
  echo "(the 10- and 100-query cases once); peak memory is the device's (\`max_memory_allocated\`) on GPUs,"
  echo "the process's resident peak on CPUs. Whole run: ${seconds} s."
  echo
  for dtype in float32 bfloat16; do
    sed 's/^### /## /' "$TMP/$dtype.md" | grep -v '^(total benchmark time'
    echo
  done
} > "$OUT"
echo "wrote $OUT (${seconds} s)" >&2

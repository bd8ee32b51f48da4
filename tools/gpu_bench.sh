#!/usr/bin/env bash
# The GPU table of docs/performance.md in one run (about 7 minutes on one H100):
# an SD3.5-medium-shaped MMDiT (2.5 B parameters, random init), bf16, SD3-shaped synthetic batches
# (16 x 64² / 128² latents, 333 text tokens of width 4096), at 512² and 1024²: t2i's DeepSpeed step
# (ZeRO-2, t2i's loss) against a plain diffusers-style loop (fp32 weights, bf16 autocast, fused AdamW),
# activation checkpointing off / on, torch.compile (per block) off / on. Batch sizes: the first of
# each list that fits in memory. Groups that would start after BUDGET seconds are skipped.
#
#   bash tools/gpu_bench.sh OUT_DIR          # writes OUT_DIR/gpu-bench.md, results.jsonl
set -uo pipefail
OUT=${1:-runs/gpu-bench}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-420}
PRESET=${PRESET:-sd3.5-medium}  # PRESET=tiny LO=32 HI=64 PYTHON=.venv/bin/python: a CPU smoke test
LO=${LO:-512}
HI=${HI:-1024}
DEADLINE=$(( $(date +%s) + BUDGET ))
WORK=$(mktemp -d)
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.version.cuda)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
run() {  # name, then bench arguments
  local name=$1; shift
  $PY -m tools.bench --synthetic --preset "$PRESET" --precision bf16 --nproc 1 --in-process \
      --deadline "$DEADLINE" --variants zero2,bare --out "$WORK/$name" "$@" || echo "[gpu_bench] $name failed"
}
run 512-eager   --resolution $LO  --ckpt off --batch-size 12,8,6,4 --warmup 2 --steps 5
run 512-ckpt    --resolution $LO  --ckpt on  --batch-size 48,32,16 --warmup 2 --steps 4
run 1024-ckpt   --resolution $HI  --ckpt on  --batch-size 16,12,8  --warmup 2 --steps 3
run 1024-eager  --resolution $HI  --ckpt off --batch-size 3,2,1    --warmup 2 --steps 3
run 512-compile --resolution $LO  --ckpt off --compile on --batch-size 12,8,6,4 --warmup 3 --steps 5
for g in 512-eager 512-ckpt 1024-ckpt 1024-eager 512-compile; do
  [ -f "$WORK/$g/bench.md" ] && { echo "## $g"; echo; cat "$WORK/$g/bench.md"; echo; } >> "$OUT/gpu-bench.md"
  [ -f "$WORK/$g/results.jsonl" ] && cat "$WORK/$g/results.jsonl" >> "$OUT/results.jsonl"
done
cat "$OUT/gpu-bench.md" 2>/dev/null

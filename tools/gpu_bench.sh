#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one run, sized for a lent GPU's 9 minutes (start-up included) on one
# H100 / H200: an SD3.5-medium-shaped MMDiT (2.24 B parameters, random init), bf16, SD3-shaped synthetic
# batches (16 x 64² / 128² latents, 333 text tokens of width 4096). Groups, most important first:
#
#   512-compiled   t2i's DeepSpeed ZeRO-2 step vs the compiled plain loop (fp32 + bf16 autocast, fused AdamW)
#                  at the same batch, whole-model torch.compile; beside them the DeepSpeed step as it was
#                  before issue #15 ($OLD below: foreach AdamW, per-tensor overflow pass, DeepSpeed's
#                  communication defaults), so the optimizer step by part shows what changed
#   512-selective  the largest batch without full activation checkpointing: every 2nd block recomputed
#   1024-compiled  the same pair at 1024²
#   512-zero3      a ZeRO-3 row (eager: ZeRO-3's parameter hooks under compile were never tried here)
#   512-lora       LoRA (rank 16, the default attention targets: 243 layers, 11.9 M parameters) against full
#                  fine-tuning, ZeRO-2, eager, the same batch: the ratio LoRA / full and the optimizer step by
#                  part (tools/bench_lora.py); then the same pair under ZeRO-3 (512-lora-zero3). No
#                  --ckpt-bytes here: the full model's tag would be ~31 GB of disk writes (2 B weights + 12 B
#                  optimizer state per parameter); the CPU runs measure the tag bytes (docs/performance.md)
#
# Every table has images/s, phases, MFU against the dense bf16 peak (989 TFLOP/s for H100 / H200 SXM), the
# SDPA kernel that ran and DeepSpeed's optimizer step by part (overflow check, grad norm, grads to fp32,
# update, copy back, all-gather). OUT/gpu-bench.md is rewritten after every variant, so a run cut off by the
# lease still returns what it measured; a group that would start after BUDGET seconds is skipped.
#
#   bash tools/gpu_bench.sh OUT_DIR                                   # writes OUT_DIR/gpu-bench.md, results.jsonl
#   PRESET=tiny LO=32 HI=64 PYTHON=.venv/bin/python bash tools/gpu_bench.sh /tmp/dry   # the CPU dry run
set -uo pipefail
OUT=${1:-runs/gpu-bench}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-400}            # seconds after which no group or variant starts (9 min - a variant - margin)
PRESET=${PRESET:-sd3.5-medium}   # PRESET=tiny LO=32 HI=64: the CPU dry run
LO=${LO:-512}
HI=${HI:-1024}
DEADLINE=$(( $(date +%s) + BUDGET ))
GROUPS_RUN=()
mkdir -p "$OUT"
: > "$OUT/gpu-bench.md"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', torch.version.cuda)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true

collect() {  # OUT/gpu-bench.md and OUT/results.jsonl from every group so far
  local md="$OUT/.gpu-bench.md.$BASHPID" jsonl="$OUT/.results.jsonl.$BASHPID"
  : > "$md"; : > "$jsonl"
  for g in "${GROUPS_RUN[@]}"; do
    [ -f "$OUT/$g/bench.md" ] && { echo "## $g"; echo; cat "$OUT/$g/bench.md"; echo; } >> "$md"
    [ -f "$OUT/$g/results.jsonl" ] && cat "$OUT/$g/results.jsonl" >> "$jsonl"
  done
  mv "$md" "$OUT/gpu-bench.md"; mv "$jsonl" "$OUT/results.jsonl"   # renames: a reader never sees half a file
}

run() {  # name, variants, then bench arguments
  local name=$1 variants=$2; shift 2
  if [ "$(date +%s)" -gt "$DEADLINE" ]; then echo "[gpu_bench] budget spent: skipping $name"; return; fi
  GROUPS_RUN+=("$name")
  # bench.md is rewritten after every variant (tools/bench.py); collect() runs in the background meanwhile
  ( while sleep 15; do collect; done ) & local watcher=$!
  $PY -m tools.bench --synthetic --preset "$PRESET" --precision bf16 --nproc 1 --in-process \
      --deadline "$DEADLINE" --variants "$variants" --out "$OUT/$name" "$@" || echo "[gpu_bench] $name failed"
  kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null
  collect
}

# The DeepSpeed step as it was before issue #15: foreach AdamW, DeepSpeed's per-tensor overflow pass, its
# default communication settings (overlap off for ZeRO-2, 5e8-element buckets).
OLD="+optimizer.implementation=foreach+deepspeed.overflow_check=per_tensor+deepspeed.overlap_comm=false"
OLD="$OLD+deepspeed.reduce_bucket_size=5e8+deepspeed.allgather_bucket_size=5e8"
run 512-compiled  "zero2,bare,zero2$OLD" \
    --resolution "$LO" --compile on --batch-size 16,12,8 --warmup 2 --steps 4
run 512-selective "zero2+model.gradient_checkpointing=2" \
    --resolution "$LO" --compile on --batch-size 48,32,24 --warmup 2 --steps 3
run 1024-compiled zero2,bare \
    --resolution "$HI" --compile on --batch-size 4,3,2 --warmup 2 --steps 3
run 512-zero3     zero3 \
    --resolution "$LO" --batch-size 12,8 --warmup 2 --steps 3
# LoRA after the groups above (they run first; these only if the budget is left). One batch size for both
# variants of a pair, so the step-time ratio compares the same work (a list could give the two different sizes).
run 512-lora       "zero2,zero2+lora.rank=16" \
    --resolution "$LO" --batch-size 8 --warmup 2 --steps 4
run 512-lora-zero3 "zero3,zero3+lora.rank=16" \
    --resolution "$LO" --batch-size 8 --warmup 2 --steps 3
cat "$OUT/gpu-bench.md"

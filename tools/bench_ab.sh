#!/usr/bin/env bash
# Before / after for code changes that no config key can switch off: `t2i bench` from an earlier commit and
# from this tree, back to back, ROUNDS times (base, this, base, this, ...), then the per-round ratios
# (median [min-max] over rounds) of each tree. Config-level changes are better compared inside one run
# (`t2i bench --variants t2i,t2i+key=value --repeats N`); this is for the rest.
#
#   bash tools/bench_ab.sh BASE_COMMIT [ROUNDS] [OUT] [-- bench arguments]
#   bash tools/bench_ab.sh f04e6f3 4 runs/ab -- --variants bare,t2i,mixflow --steps 20 --warmup 5
#
# The earlier tree is exported with `git archive` (the repository is not touched) and shares this tree's
# data/. Trees older than the CPU-time column of t2i bench report wall time only.
set -euo pipefail
BASE=$1; ROUNDS=${2:-4}; OUT=${3:-runs/ab}; shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
ARGS=("$@"); [ ${#ARGS[@]} -eq 0 ] && ARGS=(--variants bare,t2i,mixflow --steps 20 --warmup 5)
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TREE=$(mktemp -d)
git -C "$HERE" archive "$BASE" | tar -x -C "$TREE"
[ -d "$HERE/data" ] && ln -s "$HERE/data" "$TREE/data"
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
for i in $(seq 1 "$ROUNDS"); do
  (cd "$TREE" && PYTHONPATH="$TREE" $PY -m t2i.cli bench --nproc 2 --in-process "${ARGS[@]}" --out "$OUT/base-$i" \
      > "$OUT/base-$i.log" 2>&1) || echo "[bench_ab] base round $i failed (see $OUT/base-$i.log)"
  (cd "$HERE" && PYTHONPATH="$HERE" $PY -m t2i.cli bench --nproc 2 --in-process "${ARGS[@]}" --out "$OUT/new-$i" \
      > "$OUT/new-$i.log" 2>&1) || echo "[bench_ab] new round $i failed (see $OUT/new-$i.log)"
done
rm -rf "$TREE"
$PY - "$OUT" <<'EOF'
import glob, json, statistics, sys
out = sys.argv[1]
for tree in ("base", "new"):
    rounds = [{r.get("spec", r["variant"]): r for r in map(json.loads, open(f))}
              for f in sorted(glob.glob(f"{out}/{tree}-*/results.jsonl"))]
    print(f"== {tree}: {len(rounds)} rounds")
    names = sorted({v for r in rounds for v in r})
    for a in names:
        for b in names:
            if a == b or b not in ("bare", "t2i"):
                continue
            for field in ("step_ms_median", "cpu_ms_median"):
                xs = [r[a][field] / r[b][field] for r in rounds if a in r and b in r and r[a].get(field) and r[b].get(field)]
                if xs:
                    print(f"  {a} / {b} ({field}): {statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]")
EOF

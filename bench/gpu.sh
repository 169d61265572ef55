#!/usr/bin/env bash
# The three benchmarks on a CUDA device, in under 10 minutes in all, with a short table last.
#
#   bash bench/gpu.sh                      # JSON, logs and the quality outputs go to bench/results/
#   BENCH_OUT=/some/dir bash bench/gpu.sh  # ... or there
#
# Real text, tokenizer and the MiniLM teacher are looked up in $SHARED_DIR, ./shared, then ../shared. A device
# machine gets a copy of the repo only, so ../shared is not there: without a shared folder the retraining benchmark
# falls back to random token ids of WikiText-like lengths and bench/quality.py (which needs the teacher) is skipped.
# Every step has a time cap and the whole script a budget (BENCH_BUDGET_S, default 570 s); a failing step is
# reported in the final table and does not stop the others.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
OUTDIR=${BENCH_OUT:-bench/results}
BUDGET=${BENCH_BUDGET_S:-570}
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

SHARED=""
for d in "${SHARED_DIR:-}" shared ../shared; do
  if [ -n "$d" ] && [ -d "$d" ]; then SHARED=$d; break; fi
done
TEXT=${SHARED:+$SHARED/data/wikitext2/valid.txt}
TOKENIZER=${SHARED:+$SHARED/models/minilm-mlm-wikitext2}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
"$PY" - <<'EOF' || { echo "error: torch sees no CUDA device"; exit 1; }
import sys
import torch
ok = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if ok else "NONE"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device:", name)
sys.exit(0 if ok else 1)
EOF
echo "shared folder: ${SHARED:-none (random token ids; quality benchmark skipped)}"

START=$SECONDS
declare -A STATUS SECS
STEPS=()

# step NAME CAP_SECONDS COMMAND...: run with a timeout of min(cap, budget left), log to $OUTDIR/NAME.log
step() {
  local name=$1 cap=$2 left t0 rc
  shift 2
  STEPS+=("$name")
  left=$(( BUDGET - (SECONDS - START) ))
  (( left < cap )) && cap=$left
  if (( cap < 30 )); then
    STATUS[$name]="skipped (time budget spent)"; SECS[$name]=0; return
  fi
  echo; echo "=== $name (cap ${cap}s): $*"
  t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  rc=${PIPESTATUS[0]}
  SECS[$name]=$(( SECONDS - t0 ))
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="timed out after ${cap}s" ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
}

RT_DATA=()
[ -n "$SHARED" ] && RT_DATA=(--text "$TEXT" --tokenizer "$TOKENIZER")
step retrain_throughput 210 "$PY" bench/retrain_throughput.py --device cuda --sentences 2048 --epochs 3 \
  --batch-size 32 --repeats 2 ${RT_DATA[@]+"${RT_DATA[@]}"} --cache-root "$OUTDIR" \
  --json "$OUTDIR/retrain_throughput_cuda.json"

step inference_fp32 70 "$PY" bench/inference_speed.py --device cuda --dtype fp32 --repeats 50 --warmup 5 \
  --json "$OUTDIR/inference_speed_cuda_fp32.json"
step inference_bf16 60 "$PY" bench/inference_speed.py --device cuda --dtype bf16 --repeats 50 --warmup 5 \
  --json "$OUTDIR/inference_speed_cuda_bf16.json"

if [ ! -f bench/quality.py ]; then
  STEPS+=(quality); STATUS[quality]="skipped (bench/quality.py not found)"; SECS[quality]=0
elif [ -z "$SHARED" ] || [ ! -d "$SHARED/models/minilm-mlm-wikitext2" ]; then
  STEPS+=(quality); STATUS[quality]="skipped (no teacher: put it in ./shared or set SHARED_DIR)"; SECS[quality]=0
else
  SPLIT=bench/results/wikitext2_split
  if [ ! -f "$SPLIT/test.txt" ]; then
    SPLIT=$OUTDIR/wikitext2_split
    "$PY" bench/prepare_wikitext2.py --src "$TEXT" --out "$SPLIT"
  fi
  Q_ARGS=(--quick --teacher "$SHARED/models/minilm-mlm-wikitext2" --data-dir "$SPLIT" --out "$OUTDIR/quality_quick")
  "$PY" bench/quality.py --help 2>/dev/null | grep -q -- "--device" && Q_ARGS+=(--device cuda)
  step quality 300 "$PY" bench/quality.py "${Q_ARGS[@]}"
  [ -f "$OUTDIR/quality_quick/quality.md" ] && { echo; cat "$OUTDIR/quality_quick/quality.md"; }
fi

echo
echo "=== summary ($(( SECONDS - START ))s in all; results in $OUTDIR)"
for s in "${STEPS[@]}"; do printf '%-20s %-45s %4ss\n' "$s" "${STATUS[$s]}" "${SECS[$s]}"; done
"$PY" - "$OUTDIR" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
rt = out / "retrain_throughput_cuda.json"
if rt.is_file():
    r = json.loads(rt.read_text())
    s, q = r["sentences_per_s"], r["ratios"]
    rows.append((f"retrain {r['blocks']} blocks x {r['epochs']} ep, {r['sentences']} sent",
                 f"(a) {s['a']:.0f}  (b) {s['b']:.0f}  (c) {s['c']:.0f}  (c reused) {s['c_train']:.0f} sent/s",
                 f"(b)/(a) {q['b_over_a']:.2f}x  (c)/(a) {q['c_over_a']:.2f}x"))
for dt in ("fp32", "bf16"):
    f = out / f"inference_speed_cuda_{dt}.json"
    if f.is_file():
        r = json.loads(f.read_text())
        m = r["models"]
        enc = "  ".join(f"{k} {v['encoder']['sentences_per_s']:.0f}" for k, v in m.items())
        rows.append((f"inference {dt} {r['batch_size']}x{r['seq_len']} encoder sent/s", enc,
                     f"merged {r['merged_encoder_speedup']:.2f}x"))
print("| benchmark | throughput | ratio |\n|---|---|---|")
for a, b, c in rows:
    print(f"| {a} | {b} | {c} |")
EOF

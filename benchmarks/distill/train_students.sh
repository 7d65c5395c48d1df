#!/usr/bin/env bash
# The students of the bundled models measured in benchmarks/results/distill/: one `hasten distill` run per
# method, one after the other, on one CPU core (OMP_NUM_THREADS=1); the two models' queues ran side by side on
# the 2-core machine. Usage: train_students.sh MODEL OUTDIR [SCALE]  (SCALE multiplies every time budget).
# Resumable: rerunning continues every run from its checkpoint (--resume).
set -euo pipefail
model=$1; out=$2; scale=${3:-1}
mkdir -p "$out"
export OMP_NUM_THREADS=1
minutes() { python3 -c "print(round($1 * $scale, 2))"; }
run() {  # name minutes args...
  local name=$1 budget; budget=$(minutes "$2"); shift 2
  hasten distill --teacher "$model" --out "$out/$name" --minutes "$budget" --resume --format json "$@" \
    > "$out/$name.log" 2>&1 || { echo "$name failed (see $out/$name.log)"; return 0; }
  echo "$name done: $(tail -1 "$out/$name.log")"
}
run dmd-1 13 --method dmd --nfe 1 --batch-size 32
run mmd-2 7 --method mmd --nfe 2 --batch-size 64
run consistency-2 7 --method consistency --nfe 2 --batch-size 32
run reflow-2 8 --method reflow --nfe 2 --batch-size 32 --option couplings=1024 --option teacher_steps=16
run ctm-2 7 --method ctm --nfe 2 --batch-size 32
run guidance-4 4 --method guidance --nfe 4 --guidance 2 --batch-size 32
run slimflow-1 4 --method slimflow --nfe 1 --batch-size 32 --lr 5e-4 --option couplings=1024 --option teacher_steps=16

#!/usr/bin/env bash
# One bench run per bundled model: its students (every method) beside the teacher's stock samplers at 1, 2 and
# 4 NFE, its tuned 5-NFE plan and its converged reference (100-step third-order solve), on the same held-out
# noise; then `hasten optimize` with the students as candidates. Usage: bench_students.sh MODEL RUNS OUT
# (RUNS: the folder train_students.sh wrote, plus RUNS/../pd-TAG-2, the progressive student).
set -euo pipefail
model=$1; runs=$2; out=$3; progressive=$4
export OMP_NUM_THREADS=1
students=(--student "$progressive")
for s in "$runs"/*/; do [ -f "$s/hasten.json" ] && students+=(--student "${s%/}"); done
hasten bench --model "$model" --preset distill --out "$out/bench" --resume "${students[@]}" \
  --plan "plans/$model-nfe5-fitted.json" --format json > "$out/bench.log" 2>&1
hasten optimize --model "$model" --minutes "${OPT_MINUTES:-20}" --out "$out/$model.recipe.json" --no-peers \
  --tune-share 0 --no-caches --plan plans --solver euler --solver dpmpp_2m --solver unipc --solver unipc:order=3 \
  "${students[@]}" --format json > "$out/optimize.log" 2>&1

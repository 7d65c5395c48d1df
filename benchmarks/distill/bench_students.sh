#!/usr/bin/env bash
# One bench run per bundled model: its students (every method) beside the teacher's stock samplers at 1, 2 and
# 4 NFE, its tuned 5-NFE plan and its converged reference (100-step third-order solve), on the same held-out
# noise; then `hasten optimize` with the students as candidates. Usage: bench_students.sh MODEL RUNS OUT
# (RUNS: a folder of student folders, e.g. the one train_students.sh wrote).
set -euo pipefail
model=$1; runs=$2; out=$3
export OMP_NUM_THREADS=1
students=()
for s in "$runs"/*/; do [ -f "$s/hasten.json" ] && students+=(--student "${s%/}"); done
[ -f "$out/bench/results.jsonl" ] && [ -n "${SKIP_BENCH:-}" ] || hasten bench --model "$model" --preset distill --out "$out/bench" --resume "${students[@]}" \
  --plan "plans/$model-nfe5-fitted.json" --format json > "$out/bench.log" 2>&1
# optimize searches at guidance 1: a guidance-distilled student (it learned a guided sampler) is left out
unguided=()
for s in "$runs"/*/; do
  [ -f "$s/hasten.json" ] && ! grep -q '"method": "guidance"' "$s/hasten.json" && unguided+=(--student "${s%/}")
done
rm -rf "$out/$model.recipe.optimize"
hasten optimize --model "$model" --minutes "${OPT_MINUTES:-20}" --out "$out/$model.recipe.json" --no-peers \
  --tune-share 0 --no-caches --plan plans --solver euler --solver dpmpp_2m --solver unipc --solver unipc:order=3 \
  "${unguided[@]}" --format json > "$out/optimize.log" 2>&1

#!/usr/bin/env bash
# Compare the engine with the two baselines on one model: latency tables, bursts,
# Poisson load, an Azure-Functions-shaped trace (if given) and a rate sweep.
#
#   MODEL=glide-small STEPS=20 OUT=bench-results/compare benchmarks/compare_systems.sh [TRACE.csv]
#
# Rates are in requests/s; pick them around the isolated throughput of the model on
# the machine (glideserve bench latency prints it). Every run writes its own folder.
set -euo pipefail

MODEL="${MODEL:-glide-small}"
STEPS="${STEPS:-20}"
OUT="${OUT:-bench-results/compare-$(date +%Y%m%d-%H%M%S)}"
RATE="${RATE:-1}"
SWEEP_RATES="${SWEEP_RATES:-0.5,1,2,4}"
DURATION="${DURATION:-60}"
SLO_SCALE="${SLO_SCALE:-4}"
SINGLE_COUNT="${SINGLE_COUNT:-20}"   # single-request latency run: requests 1 s apart
BATCH_COUNT="${BATCH_COUNT:-24}"     # batched latency run: requests sent at once
NUM_BURSTS="${NUM_BURSTS:-6}"        # bursts of 20 requests every 10 s
TRACE="${1:-}"
SYSTEMS=(--system glideserve --system diffusers-sequential --system request-batching)
COMMON=(--model "$MODEL" --steps "$STEPS" "${SYSTEMS[@]}")

glideserve bench latency "${COMMON[@]}" --single-count "$SINGLE_COUNT" --batch-count "$BATCH_COUNT" \
    --out "$OUT/latency"
glideserve bench load "${COMMON[@]}" --arrival bursts --burst-size 20 --burst-interval 10 --num-bursts "$NUM_BURSTS" \
    --slo-scale "$SLO_SCALE" --out "$OUT/bursts"
glideserve bench load "${COMMON[@]}" --arrival poisson --rate "$RATE" --duration "$DURATION" \
    --slo-scale "$SLO_SCALE" --out "$OUT/poisson"
if [[ -n "$TRACE" ]]; then
    glideserve bench load "${COMMON[@]}" --arrival trace --trace "$TRACE" --rate "$RATE" --duration "$DURATION" \
        --slo-scale "$SLO_SCALE" --out "$OUT/trace"
fi
glideserve bench sweep "${COMMON[@]}" --rates "$SWEEP_RATES" --duration "$DURATION" --slo-scale "$SLO_SCALE" \
    --out "$OUT/sweep"
echo "results in $OUT"

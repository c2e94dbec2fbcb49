#!/usr/bin/env bash
# The measurements behind docs/benchmarks.md, on one machine, in one run:
#  1. capacity of diffusers-sequential = 1 / its isolated latency (median of single requests);
#  2. an Azure-Functions-shaped trace fitted to DURATION seconds at 0.8x and 1.5x that capacity,
#     SLO = 5x the isolated latency, for the three systems side by side;
#  3. a rate sweep at 0.5x .. 3x that capacity.
#
#   MODEL=glide-small benchmarks/cpu_report.sh TRACE.csv [OUT]
set -euo pipefail
TRACE="${1:?usage: benchmarks/cpu_report.sh TRACE.csv [OUT]}"
OUT="${2:-bench-results/cpu-report}"
MODEL="${MODEL:-glide-small}"
STEPS="${STEPS:-20}"
DURATION="${DURATION:-90}"
SWEEP_DURATION="${SWEEP_DURATION:-45}"
SWEEP_FACTORS="${SWEEP_FACTORS:-0.5 1 1.5 2 3}"
# The first system's isolated latency is the SLO reference for all three.
SYSTEMS=(--system diffusers-sequential --system request-batching --system glideserve)

glideserve bench latency --model "$MODEL" --system diffusers-sequential --steps "$STEPS" \
    --single-count 10 --interval 0.5 --batch-count 0 --out "$OUT/capacity"
CAPACITY=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(1/d["diffusers-sequential"]["single"]["latency_s"]["p50"])' "$OUT/capacity/latency.json")
echo "diffusers-sequential capacity: $CAPACITY req/s"

for factor in 0.8 1.5; do
    rate=$(python3 -c "print(round($CAPACITY * $factor, 3))")
    glideserve bench load --model "$MODEL" "${SYSTEMS[@]}" --steps "$STEPS" --arrival trace --trace "$TRACE" \
        --rate "$rate" --duration "$DURATION" --slo-scale 5 --out "$OUT/trace-${factor}x"
done

rates=$(python3 -c "import sys; print(','.join(str(round($CAPACITY * float(f), 3)) for f in sys.argv[1:]))" $SWEEP_FACTORS)
glideserve bench sweep --model "$MODEL" "${SYSTEMS[@]}" --steps "$STEPS" --rates "$rates" \
    --duration "$SWEEP_DURATION" --slo-scale 5 --out "$OUT/sweep"
echo "results in $OUT"

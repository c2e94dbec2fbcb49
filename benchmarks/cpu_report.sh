#!/usr/bin/env bash
# The measurements behind docs/benchmarks.md, on one machine, in one run:
#  1. capacity of diffusers-sequential = 1 / its isolated latency (median of single requests);
#  2. an Azure-Functions-shaped trace fitted to DURATION seconds at 0.8x, 1.5x and 3x that capacity,
#     SLO = 5x the isolated latency, for four systems side by side: diffusers-sequential,
#     request-batching (with load shedding), glideserve --policy slack (the default) and
#     glideserve --policy fcfs (deadline-blind);
#  3. a mixed-steps workload (STEPS_MIX, each request draws one) on the same trace at the rate
#     whose offered work equals 1.5x capacity, each class's SLO 5x its own isolated latency;
#  4. the drop tolerance (DROP_VALUES non-empty): glideserve slack at 1.5x with each --drop-late-after;
#  5. optionally (SWEEP_FACTORS non-empty) a Poisson rate sweep.
#
#   MODEL=glide-small benchmarks/cpu_report.sh TRACE.csv [OUT]
#   CAPACITY=3.0 DURATION=50 DROP_VALUES="" benchmarks/cpu_report.sh TRACE.csv [OUT]   # fixed rates, no drop sweep
set -euo pipefail
TRACE="${1:?usage: benchmarks/cpu_report.sh TRACE.csv [OUT]}"
OUT="${2:-bench-results/cpu-report}"
MODEL="${MODEL:-glide-small}"
STEPS="${STEPS:-20}"
DURATION="${DURATION:-60}"
FACTORS="${FACTORS:-0.8 1.5 3}"
STEPS_MIX="${STEPS_MIX:-10,20,40}"
DROP_VALUES="${DROP_VALUES:-0 0.25 1 never}"
SWEEP_DURATION="${SWEEP_DURATION:-45}"
SWEEP_FACTORS="${SWEEP_FACTORS:-}"
# The first system's isolated latency is the SLO reference for all of them.
# glideserve without step caching (--cache none): these runs measure scheduling alone; docs/caching.md adds caching.
SYSTEMS=(--system diffusers-sequential --system request-batching
         --system "glideserve-slack=glideserve --policy slack --cache none"
         --system "glideserve-fcfs=glideserve --policy fcfs --cache none")
COMMON=(--model "$MODEL" --arrival trace --trace "$TRACE" --duration "$DURATION")

# Measure glideserve's latency profile once, up front, and cache it: every glideserve server below
# loads it from the cache instead of sweeping while the previous server's process winds down.
glideserve profile --model "$MODEL" --refresh
# CAPACITY (req/s) may be given, to compare runs at the same rates and SLO on a machine whose
# speed drifts; otherwise it is measured here.
if [ -z "${CAPACITY:-}" ]; then
    glideserve bench latency --model "$MODEL" --system diffusers-sequential --steps "$STEPS" \
        --single-count 10 --interval 0.5 --batch-count 0 --out "$OUT/capacity"
    CAPACITY=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(1/d["diffusers-sequential"]["single"]["latency_s"]["p50"])' "$OUT/capacity/latency.json")
fi
echo "diffusers-sequential capacity: $CAPACITY req/s"
# The SLO of the fixed-steps runs: 5x diffusers-sequential's isolated latency, the same for every run.
SLO_MS=$(python3 -c "print(round(5000 / $CAPACITY))")
rate_for() { python3 -c "print(round($CAPACITY * $1, 3))"; }

for factor in $FACTORS; do
    glideserve bench load "${COMMON[@]}" "${SYSTEMS[@]}" --steps "$STEPS" --rate "$(rate_for "$factor")" \
        --slo-ms "$SLO_MS" --out "$OUT/trace-${factor}x"
done

# Same offered work as 1.5x: the mean request of the mix takes mean(STEPS_MIX) / STEPS as long.
MIX_FACTOR=$(python3 -c "m=[int(s) for s in '$STEPS_MIX'.split(',')]; print(round(1.5 * $STEPS * len(m) / sum(m), 3))")
glideserve bench load "${COMMON[@]}" "${SYSTEMS[@]}" --steps-mix "$STEPS_MIX" --rate "$(rate_for "$MIX_FACTOR")" \
    --slo-scale 5 --no-count-flops --out "$OUT/mixed-steps"

if [ -n "$DROP_VALUES" ]; then
    DROP_SYSTEMS=()
    for value in $DROP_VALUES; do
        DROP_SYSTEMS+=(--system "drop-${value}=glideserve --policy slack --cache none --drop-late-after $value")
    done
    glideserve bench load "${COMMON[@]}" --slo-ms "$SLO_MS" --system "glideserve-slack=glideserve --policy slack --cache none" \
        "${DROP_SYSTEMS[@]}" --steps "$STEPS" --rate "$(rate_for 1.5)" --no-count-flops --out "$OUT/drop-tolerance"
fi

if [ -n "$SWEEP_FACTORS" ]; then
    rates=$(python3 -c "import sys; print(','.join(str(round($CAPACITY * float(f), 3)) for f in sys.argv[1:]))" $SWEEP_FACTORS)
    glideserve bench sweep --model "$MODEL" "${SYSTEMS[@]}" --steps "$STEPS" --rates "$rates" \
        --duration "$SWEEP_DURATION" --slo-ms "$SLO_MS" --out "$OUT/sweep"
fi
echo "results in $OUT"

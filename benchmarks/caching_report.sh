#!/usr/bin/env bash
# The measurements behind docs/caching.md, on one machine, in one run:
#  1. load: the MAF trace at LOAD_FACTORS x CAPACITY req/s (SLO = 5x diffusers-sequential's isolated
#     latency at 20 steps, as in docs/benchmarks.md), glideserve with the default slack scheduling and
#     --cache none / glideserve:5 / adaptive, against request-batching; every served image is read by the
#     judge and compared with the exact engine's (bench load --score-images);
#  2. latency alone through the server at 50 steps: cache none against glideserve:5;
#  3. the policy table: every policy at 20 and 50 steps over every toy caption, two seeds each, with and
#     without latent-aware denoising (bench caching).
#
#   CAPACITY=3.59 MODEL=glide-small benchmarks/caching_report.sh TRACE.csv [OUT]
#   PARTS="load" LOAD_FACTORS="1.5" benchmarks/caching_report.sh TRACE.csv [OUT]    # some parts only
set -euo pipefail
TRACE="${1:?usage: benchmarks/caching_report.sh TRACE.csv [OUT]}"
OUT="${2:-bench-results/caching-report}"
MODEL="${MODEL:-glide-small}"
CAPACITY="${CAPACITY:-3.59}"
DURATION="${DURATION:-45}"
LOAD_FACTORS="${LOAD_FACTORS:-0.5 1.5 3}"
PARTS="${PARTS:-load alone table}"
SLO_MS=$(python3 -c "print(round(5000 / $CAPACITY))")
has() { [[ " $PARTS " == *" $1 "* ]]; }

glideserve profile --model "$MODEL" --refresh
has load && for factor in $LOAD_FACTORS; do
    rate=$(python3 -c "print(round($CAPACITY * $factor, 3))")
    glideserve bench load --model "$MODEL" --arrival trace --trace "$TRACE" --duration "$DURATION" --rate "$rate" \
        --steps 20 --slo-ms "$SLO_MS" --no-count-flops --score-images \
        --system request-batching --system "none=glideserve --cache none" \
        --system "glideserve-5=glideserve --cache glideserve:5" --system "adaptive=glideserve --cache adaptive" \
        --out "$OUT/load-${factor}x"
done
has alone && glideserve bench latency --model "$MODEL" --steps 50 --single-count 10 --interval 0.5 \
    --batch-count 0 --system "none=glideserve --cache none" --system "glideserve-5=glideserve --cache glideserve:5" \
    --out "$OUT/alone-50-steps"
has table && glideserve bench caching --model "$MODEL" --steps 20 --steps 50 --seeds 2 --out "$OUT/table" \
    --policy none --policy glideserve:2 --policy glideserve:5 --policy fora:2 --policy fora:5 \
    --policy taylorseer:2 --policy taylorseer:3 --policy teacache:0.3 --policy teacache:0.6 \
    --policy fbcache:0.1 --policy fbcache:0.2
echo "results in $OUT"

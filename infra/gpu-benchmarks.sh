#!/usr/bin/env bash
# Real-size speed benchmarks on one GPU: FLUX.2-klein 4B and Z-Image 6B with SigLIP2 so400m and each preset's
# default predictor, all with random weights (no checkpoint is read: speed and memory only). Each bench prints its
# table and records its figures in the results store under $I2L_DATA_ROOT (default data/).
#   bash infra/gpu-benchmarks.sh            # both presets
#   PRESETS=klein4b bash infra/gpu-benchmarks.sh
#   SETS="--set predictor.hidden=2048 --set predictor.depth=28" bash infra/gpu-benchmarks.sh   # other sizes
# (that predictor, 1.5 B + the 0.43 B encoder, is about the 1.9-2.3 B the paper reports for its i2L models)
# First, the two arrangements of the CFG branches on this GPU (the sampler's "auto" must pick the faster one).
# The real presets' model code on replicas of their checkpoints, on this GPU: infra/gpu_replica_path.py.
set -uo pipefail
I2L=${I2L:-i2l}
status=0
for batch in 8 64; do
    $I2L bench cfg --device cuda --batch "$batch" || status=1  # the toy backbone
done
for preset in ${PRESETS:-klein4b zimage}; do
    echo "=== $preset"
    # shellcheck disable=SC2086  # SETS is a list of options
    $I2L info --preset "$preset" ${SETS:-} || status=1
    # the two arrangements of the CFG branches at this preset's size (1024², random weights)
    $I2L bench cfg --device cuda --preset "$preset" --batch 4 --steps 2 --rounds 3 ${SETS:-} || status=1
    # one target per GPU per step, as the paper trains (global batch 8 on 8 GPUs)
    $I2L bench train-step --preset "$preset" --batch 1 --rounds 5 --warmup 2 ${SETS:-} || status=1
    # the cost half of amortization: one i2L forward vs one per-style step, at 1 and 4 rows per step
    $I2L bench amortization --random-init --preset "$preset" --styles 16 --per-style-batches 1,4 --rounds 5 ${SETS:-} || status=1
done
exit $status

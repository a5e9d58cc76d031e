#!/usr/bin/env bash
# The shots ablation: every method with and without CD-TG (trained 1-shot on PASCAL) tested with K = 1, 3, 5 and 10
# annotated examples.
#
#   DATA=/data GPUS=1 bash scripts/ablations/shots.sh [--dry-run] [--synthetic]
#
# Settings (environment): SHOTS (default "1 3 5 10"), and DATA, GPUS, OUT, SEEDS, METHODS, TARGETS, EPISODES,
# TRAIN_ARGS, TEST_ARGS as in main_table.sh. Resumable (scripts/grid.py). --synthetic: offline CPU variant.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SHOTS="${SHOTS:-1 3 5 10}"
for seed in $SEEDS; do
    run_grid "$OUT/seed$seed" "$seed" --cdtg off on --targets $TARGETS --shots $SHOTS
done
finish

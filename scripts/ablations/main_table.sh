#!/usr/bin/env bash
# The main table: every method with and without CD-TG, trained on PASCAL (all 20 classes), tested 1- and 5-shot on
# ISIC, Chest X-ray, WBC and CHAOS (2D episodes and the volumetric protocol).
#
#   DATA=/data GPUS=1 bash scripts/ablations/main_table.sh [--dry-run] [--synthetic]
#
# Settings (environment): DATA, GPUS (0 = CPU, 1 = one process, N = torchrun), OUT (default
# logs/ablations/main_table), SEEDS (training seeds, default "0"), METHODS (default: all registered), TARGETS,
# SHOTS (default "1 5"), EPISODES (default 600), TRAIN_ARGS / TEST_ARGS (extra train.py / test.py flags).
# Resumable: run it again and only missing checkpoints and cells run (scripts/grid.py).
# --synthetic: the offline CPU variant (synthetic -> synthetic-med, random weights, tiny schedule; minutes).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SHOTS="${SHOTS:-1 5}"
for seed in $SEEDS; do
    run_grid "$OUT/seed$seed" "$seed" --cdtg off on --targets $TARGETS --shots $SHOTS
done
finish

#!/usr/bin/env bash
# The alpha ablation: the image weight alpha of CD-TG's prototype fusion (text weight 1 - alpha), swept at test time
# on each prototype host's fixed-fusion CD-TG model (no retraining), next to the baseline; with --retrain also one
# CD-TG model trained at each alpha. HSNet + CD-TG (a gated residual, no image weight) gets its baseline and CD-TG
# rows only.
#
#   DATA=/data GPUS=1 bash scripts/ablations/alpha_sweep.sh [--dry-run] [--synthetic] [--retrain]
#
# Settings (environment): ALPHAS (default "0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1"), SHOTS (default "1"), and
# DATA, GPUS, OUT, SEEDS, METHODS, TARGETS, EPISODES, TRAIN_ARGS, TEST_ARGS as in main_table.sh.
# Resumable (scripts/grid.py). --synthetic: the offline CPU variant (minutes).
ACCEPTS_RETRAIN=1
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ALPHAS="${ALPHAS:-0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1}"
SHOTS="${SHOTS:-1}"
for seed in $SEEDS; do
    run_grid "$OUT/seed$seed" "$seed" --cdtg off on --targets $TARGETS --shots $SHOTS --alphas $ALPHAS
    if [[ "$RETRAIN" == 1 ]]; then
        hosts=" $("$PYTHON" "$ABLATIONS/methods.py" --alpha-hosts) "
        METHODS="$(for m in $METHODS; do [[ "$hosts" == *" $m "* ]] && echo -n "$m "; done)"
        [[ -z "$METHODS" ]] && { echo "# --retrain: none of these methods has an image weight alpha" >&2; continue; }
        for alpha in $ALPHAS; do
            run_grid "$OUT/seed$seed/retrained/alpha$alpha" "$seed" --cdtg on --targets $TARGETS --shots $SHOTS \
                -- --fusion fixed --alpha "$alpha"
        done
    fi
done
finish

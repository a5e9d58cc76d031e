# Shared set-up of the ablation scripts (sourced, not run). Reads the command line and the environment:
#   flags:  --dry-run (print the train/test commands, run nothing)   --synthetic (the offline CPU variant)
#   DATA=folder of the benchmarks (default datasets)   GPUS=0 (CPU) | 1 (one process, default) | N (torchrun)
#   OUT=output root   SEEDS="0 1 2" (training seeds; one grid folder each)   METHODS="hsnet patnet ..." (default:
#   every registered method)   TARGETS / SHOTS / EPISODES   TRAIN_ARGS / TEST_ARGS (extra train.py / test.py flags)
# Synthetic variant: trains on `synthetic`, tests on `synthetic-med`, random backbone with BatchNorm calibration and
# random CLIP weights, tiny schedule (IMG, BSZ, EPOCHS, TRAIN_EPISODES, VAL_EPISODES, BN_CALIBRATION override it).
set -euo pipefail

ABLATIONS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$ABLATIONS/../.." && pwd)"
PYTHON="${PYTHON:-python}"
NAME="$(basename "$0" .sh)"

DRY_RUN=0
SYNTHETIC=0
RETRAIN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --synthetic) SYNTHETIC=1 ;;
        --retrain)
            if [[ "${ACCEPTS_RETRAIN:-0}" != 1 ]]; then echo "error: $NAME.sh has no --retrain" >&2; exit 2; fi
            RETRAIN=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$arg' (flags: --dry-run --synthetic${ACCEPTS_RETRAIN:+ --retrain}; settings" \
                "go in the environment, e.g. DATA=... GPUS=... bash $0)" >&2; exit 2 ;;
    esac
done

DATA="${DATA:-datasets}"
GPUS="${GPUS:-1}"
SEEDS="${SEEDS:-0}"
if ! [[ "$GPUS" =~ ^[0-9]+$ ]]; then echo "error: GPUS must be 0 (CPU), 1 or a number of GPUs, got '$GPUS'" >&2; exit 2; fi
for seed in $SEEDS; do
    if ! [[ "$seed" =~ ^[0-9]+$ ]]; then echo "error: SEEDS must be integers >= 0, got '$seed'" >&2; exit 2; fi
done
if [[ -z "${METHODS:-}" ]]; then      # every registered method, read from the registry without importing torch
    METHODS="$("$PYTHON" "$ABLATIONS/methods.py")"
fi

DEVICE_ARGS=()
GRID_GPUS="$GPUS"
if [[ "$GPUS" == 0 ]]; then DEVICE_ARGS=(--device cpu); GRID_GPUS=1; fi

if [[ "$SYNTHETIC" == 1 ]]; then
    SOURCE=synthetic
    TARGETS="${TARGETS:-synthetic-med}"
    EPISODES="${EPISODES:-48}"
    OUT="${OUT:-logs/ablations/$NAME-synthetic}"
    # 80 steps of 8 episodes at 96x96: enough for a random, BN-calibrated backbone to learn the synthetic shapes
    # (about 1-3 minutes per model on 2 CPU cores; tests/test_learning.py checks the same schedule learns)
    BASE_TRAIN=(--backbone-weights none --bn-calibration "${BN_CALIBRATION:-128}" --clip-weights none
                --img-size "${IMG:-96}" --bsz "${BSZ:-8}" --epochs "${EPOCHS:-1}"
                --episodes-per-epoch "${TRAIN_EPISODES:-640}" --val-episodes "${VAL_EPISODES:-48}" --workers 0)
    BASE_TEST="--workers 0 --bsz ${BSZ:-8}"
else
    SOURCE=pascal
    TARGETS="${TARGETS:-isic lung wbc chaos}"   # chaos: 2D episodes and the volumetric protocol
    EPISODES="${EPISODES:-600}"
    OUT="${OUT:-logs/ablations/$NAME}"
    BASE_TRAIN=(--fold all --backbone-weights imagenet)
    BASE_TEST=""
fi
read -r -a EXTRA_TRAIN <<< "${TRAIN_ARGS:-}"

# run_grid LOGROOT SEED [grid.py flags...] [-- extra train.py flags...]: one resumable grid.py call
run_grid() {
    local logroot="$1" seed="$2"
    shift 2
    local grid_flags=() train_flags=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do grid_flags+=("$1"); shift; done
    if [[ $# -gt 0 ]]; then shift; train_flags=("$@"); fi
    local test_args
    test_args="$(echo $BASE_TEST "${DEVICE_ARGS[@]}" ${TEST_ARGS:-})"
    local cmd=("$PYTHON" "$REPO/scripts/grid.py" --benchmark "$SOURCE" --datapath "$DATA" --logroot "$logroot"
               --episodes "$EPISODES" --gpus "$GRID_GPUS" --methods $METHODS)
    [[ -n "$test_args" ]] && cmd+=("--test-args=$test_args")
    cmd+=("${grid_flags[@]}")
    [[ "$DRY_RUN" == 1 ]] && cmd+=(--dry-run)
    cmd+=(-- "${BASE_TRAIN[@]}" "${DEVICE_ARGS[@]}" --seed "$seed" "${train_flags[@]}" "${EXTRA_TRAIN[@]}")
    echo "# $(printf '%q ' "${cmd[@]}")"
    "${cmd[@]}"
}

finish() {
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "# dry run: nothing was run"
    else
        echo "# done; tables and figures: $PYTHON scripts/report.py $OUT --datapath $DATA"
    fi
}

#!/usr/bin/env bash
# The no-harm check of CD-TG: does the plug-in move its host beyond the host's own seed-to-seed spread, and do its
# controls behave? Every arm is trained with each of SEEDS (paired: arm and host share the seed) and tested on one
# episode list:
#   host           the method alone
#   cdtg           + CD-TG with its defaults
#   alpha1         + CD-TG at alpha = 1 without the style augmentation: the plug-in is then an identity on the host,
#                  so this arm must equal the host (a check of the plumbing, not of the method)
#   random-text    + CD-TG with random text embeddings instead of the descriptions (--cdtg-text random)
#   shuffled-text  + CD-TG with each class described by another class's text (--cdtg-text shuffled)
#   no-style-aug   + CD-TG without the medical-style feature augmentation (a component of its own)
# Then scripts/ablations/sanity.py writes OUT/sanity.md and OUT/sanity.json: mIoU mean ± std per arm, the paired
# change against the host and whether it lies within the host's seed spread, alpha1 == host, whether the host's
# training foreground fraction levelled off, and the CD-TG health readings at the end of training.
#
#   DATA=/data GPUS=1 bash scripts/ablations/sanity.sh [--dry-run] [--synthetic]
#
# Settings (environment): ARMS (default "host cdtg alpha1 random-text shuffled-text no-style-aug"), SEEDS (default
# "0 1 2"), METHODS (default "patnet ifa"), SHOTS (default "1"), JOBS (runs in parallel, default 1; each gets
# THREADS = cores / JOBS torch threads), REPORT (folder of the report, default OUT), and DATA, GPUS, OUT, TARGETS,
# EPISODES, TRAIN_ARGS, TEST_ARGS as in
# main_table.sh. Resumable (scripts/grid.py). --synthetic: the offline CPU variant: synthetic -> synthetic-med at
# 96x96, random backbone and CLIP weights, a health reading every 10 steps, and per method a schedule after which the
# host's training foreground fraction has levelled off (STEPS_<method> steps of 8 episodes: patnet 240, ifa 100,
# others 200; PATNet predicts no foreground for its first ~100 steps), JOBS=2 (about 60 minutes on 2 CPU cores).
SANITY_METHODS="patnet ifa"
METHODS="${METHODS:-$SANITY_METHODS}"
SEEDS="${SEEDS:-0 1 2}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ARMS="${ARMS:-host cdtg alpha1 random-text shuffled-text no-style-aug}"
SHOTS="${SHOTS:-1}"
if [[ "$SYNTHETIC" == 1 ]]; then JOBS="${JOBS:-2}"; else JOBS="${JOBS:-1}"; fi
if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then echo "error: JOBS must be an integer >= 1, got '$JOBS'" >&2; exit 2; fi
CORES="$(nproc 2>/dev/null || echo 1)"
THREADS="${THREADS:-$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))}"
ALL_ARMS=" host cdtg alpha1 random-text shuffled-text no-style-aug "
for arm in $ARMS; do
    [[ "$ALL_ARMS" == *" $arm "* ]] || { echo "error: unknown arm '$arm' in ARMS (known:$ALL_ARMS)" >&2; exit 2; }
done

# steps METHOD: the synthetic schedule of METHOD, in training steps of BSZ episodes
steps() {
    local var="STEPS_$1"
    case "$1" in patnet) echo "${!var:-240}" ;; ifa) echo "${!var:-100}" ;; *) echo "${!var:-200}" ;; esac
}

# run_arm SEED ARM METHOD: one grid.py call (train once, test every target), output to OUT/logs/ when parallel
run_arm() {
    local seed="$1" arm="$2" method="$3" flags=() cdtg=on
    case "$arm" in
        host) cdtg=off ;;
        cdtg) ;;
        alpha1) flags=(--alpha 1 --no-style-aug) ;;
        random-text) flags=(--cdtg-text random) ;;
        shuffled-text) flags=(--cdtg-text shuffled) ;;
        no-style-aug) flags=(--no-style-aug) ;;
    esac
    if [[ "$SYNTHETIC" == 1 ]]; then
        flags+=(--episodes-per-epoch "$(( $(steps "$method") * ${BSZ:-8} ))" --log-every 10)
    fi
    METHODS="$method" run_grid "$OUT/seed$seed/$arm" "$seed" --cdtg "$cdtg" --targets $TARGETS --shots $SHOTS \
        -- "${flags[@]}"
}

if (( JOBS > 1 )) && (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 3) )); then
    echo "error: JOBS > 1 needs bash >= 4.3 (wait -n); this is bash $BASH_VERSION: use JOBS=1" >&2; exit 2
fi
running=0
failed=0
wait_any() {                 # the next run to finish, whichever it is (a core never waits for a slower neighbour)
    wait -n || failed=1
    running=$(( running - 1 ))
}
for seed in $SEEDS; do
    for arm in $ARMS; do
        for method in $METHODS; do
            if [[ "$DRY_RUN" == 1 || "$JOBS" == 1 ]]; then
                run_arm "$seed" "$arm" "$method"
                continue
            fi
            mkdir -p "$OUT/logs"
            log="$OUT/logs/seed$seed-$arm-$method.log"
            echo "# seed $seed, $arm, $method -> $log"
            OMP_NUM_THREADS="$THREADS" run_arm "$seed" "$arm" "$method" > "$log" 2>&1 &
            running=$(( running + 1 ))
            if (( running >= JOBS )); then wait_any; fi
        done
    done
done
while (( running > 0 )); do wait_any; done
if [[ "$failed" == 1 ]]; then echo "error: a run failed; see $OUT/logs/ (rerun to resume)" >&2; exit 1; fi
if [[ "$DRY_RUN" == 1 ]]; then
    echo "# dry run: nothing was run"
    exit 0
fi
"$PYTHON" "$ABLATIONS/sanity.py" "$OUT" --methods $METHODS --arms $ARMS ${REPORT:+--out "$REPORT"}

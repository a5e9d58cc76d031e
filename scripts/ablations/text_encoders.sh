#!/usr/bin/env bash
# The text-encoder ablation: CD-TG with each text encoder -- OpenAI CLIP RN50, ViT-B/32 (the paper's default),
# ViT-B/16, BiomedCLIP (PubMedBERT text tower) and PubMedCLIP (CLIP ViT-B/32 fine-tuned on ROCO) -- next to the
# baseline without CD-TG, per host and target. Does a biomedical text encoder help more than CLIP's?
#
#   DATA=/data GPUS=1 bash scripts/ablations/text_encoders.sh [--dry-run] [--synthetic]
#
# Settings (environment): ENCODERS (default "RN50 ViT-B-32 ViT-B-16 biomedclip pubmedclip"), ENCODER_WEIGHTS (local
# weights per encoder, e.g. "biomedclip=/models/BiomedCLIP pubmedclip=/models/pubmed-clip"; default: each encoder's
# published weights, downloaded on first use; see docs/cdtg.md, "Text encoders"), SHOTS (default "1"), TARGETS
# (default "isic lung wbc chaos abd-ct cmr kvasir": the paper's four targets and the medical few-shot benchmarks,
# with the volumetric protocol where a benchmark has it), and DATA, GPUS, OUT, SEEDS, METHODS, EPISODES, TRAIN_ARGS,
# TEST_ARGS as in main_table.sh. Resumable (scripts/grid.py). --synthetic: the offline CPU variant (random text
# encoders: it checks the plumbing, and its numbers say nothing about the encoders).
# Table: python scripts/report.py OUT (one row per host and encoder).
USER_TARGETS="${TARGETS:-}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ENCODERS="${ENCODERS:-RN50 ViT-B-32 ViT-B-16 biomedclip pubmedclip}"
SHOTS="${SHOTS:-1}"
if [[ "$SYNTHETIC" == 0 && -z "$USER_TARGETS" ]]; then TARGETS="isic lung wbc chaos abd-ct cmr kvasir"; fi
KNOWN=" $("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from text.settings import CLIP_MODELS; print(*CLIP_MODELS)' "$REPO") "

declare -A WEIGHTS=()
for pair in ${ENCODER_WEIGHTS:-}; do
    name="${pair%%=*}"
    if [[ "$pair" != *=* || "$KNOWN" != *" $name "* ]]; then
        echo "error: ENCODER_WEIGHTS entry '$pair' is not ENCODER=PATH with ENCODER one of:$KNOWN" >&2; exit 2
    fi
    WEIGHTS["$name"]="${pair#*=}"
done

for seed in $SEEDS; do
    run_grid "$OUT/seed$seed/baseline" "$seed" --cdtg off --targets $TARGETS --shots $SHOTS
    for encoder in $ENCODERS; do
        if [[ "$KNOWN" != *" $encoder "* ]]; then
            echo "error: unknown encoder '$encoder' in ENCODERS (choose from:$KNOWN)" >&2; exit 2
        fi
        flags=(--clip "$encoder")
        # the synthetic variant's --clip-weights none comes first; a later --clip-weights PATH would override it
        [[ "$SYNTHETIC" == 0 && -n "${WEIGHTS[$encoder]:-}" ]] && flags+=(--clip-weights "${WEIGHTS[$encoder]}")
        run_grid "$OUT/seed$seed/$encoder" "$seed" --cdtg on --targets $TARGETS --shots $SHOTS -- "${flags[@]}"
    done
done
finish

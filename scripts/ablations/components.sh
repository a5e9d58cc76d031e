#!/usr/bin/env bash
# The component ablation of CD-TG, one change at a time from the full model (paper attention, fixed fusion, style
# augmentation on, no LoRA, CLIP ViT-B/32): attribute attention, learned fusion, no style augmentation, LoRA on the
# text encoder, CLIP RN50 and ViT-B/16. The baseline (no CD-TG) is trained once, with the full model.
#
#   DATA=/data GPUS=1 bash scripts/ablations/components.sh [--dry-run] [--synthetic]
#
# Settings (environment): COMPONENTS (default "full attn-attributes fusion-learned no-style-aug lora clip-RN50
# clip-ViT-B-16"), LORA_RANK (default 8), SHOTS (default "1"), and DATA, GPUS, OUT, SEEDS, METHODS, TARGETS,
# EPISODES, TRAIN_ARGS, TEST_ARGS as in main_table.sh. Resumable (scripts/grid.py). --synthetic: offline CPU variant.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

COMPONENTS="${COMPONENTS:-full attn-attributes fusion-learned no-style-aug lora clip-RN50 clip-ViT-B-16}"
SHOTS="${SHOTS:-1}"
for seed in $SEEDS; do
    for component in $COMPONENTS; do
        case "$component" in
            full) flags=() ;;
            attn-attributes) flags=(--cdtg-attn attributes) ;;
            fusion-learned) flags=(--fusion learned) ;;
            no-style-aug) flags=(--no-style-aug) ;;
            lora) flags=(--text-lora "${LORA_RANK:-8}") ;;
            clip-RN50) flags=(--clip RN50) ;;
            clip-ViT-B-16) flags=(--clip ViT-B-16) ;;
            *) echo "error: unknown component '$component' in COMPONENTS" >&2; exit 2 ;;
        esac
        cdtg=(on)
        [[ "$component" == full ]] && cdtg=(off on)
        run_grid "$OUT/seed$seed/$component" "$seed" --cdtg "${cdtg[@]}" --targets $TARGETS --shots $SHOTS \
            -- "${flags[@]}"
    done
done
finish

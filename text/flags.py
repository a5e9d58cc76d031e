r"""The CD-TG plug-in's command-line flags and the names they choose from, without torch (text/plugin.py uses them;
train.py/test.py -h and argument errors need nothing more)."""
import argparse

from common.config import bounded

CLIP_MODELS = ('RN50', 'ViT-B-32', 'ViT-B-16')
ATTN_MODES = ('paper', 'attributes')
FUSIONS = ('fixed', 'learned', 'gated')
BACKGROUNDS = ('domain', 'generic')
#: The text bias u(t) of the alignment LayerNorm(F + u): bounded (ours: bias-free text layers, unit direction, a
#: learned share of each pixel's feature scale) or the reference template's unbounded form.
TEXT_BIASES = ('bounded', 'template')
#: Which text the plug-in binds: the descriptions, or one of two controls (seeded random embeddings; each class
#: described by another class's text).
TEXT_SOURCES = ('descriptions', 'random', 'shuffled')
#: The plug-in's own optimiser group (chosen on the synthetic pair, see docs/cdtg.md "Training the plug-in"): its
#: learning rate as a multiple of the host's base rate, by the host's optimizer (Adam scales every parameter's step
#: to about the learning rate whatever its gradient, so the plug-in's ~100x smaller gradients need a ~100x smaller
#: rate there; SGD's steps follow the gradient, which already makes them small), its decoupled weight decay (AdamW's
#: default) and its gradient-norm clip (a safety net against spikes, above the norms of normal training: the health
#: readings log it as grad_norm_cdtg).
LR_SCALES = {'adam': 0.01, 'sgd': 1.0}
WEIGHT_DECAY, GRAD_CLIP = 0.01, 1.0
#: Initial share ||u|| / ||F|| of the bounded text bias (it is learned, and never exceeds MAX_TEXT_RATIO).
TEXT_RATIO, MAX_TEXT_RATIO = 0.3, 1.0


def add_args(parser: argparse.ArgumentParser, stage: str) -> None:
    r"""The plug-in's flags: all of them for train.py (saved in the checkpoint), the test-time overrides for
    test.py (the rest is rebuilt from the checkpoint)."""
    descriptions_help = ('description file (text/descriptions layout, e.g. written by scripts/import_captions.py '
                         'from the reference\'s captions) for the benchmark it declares; default: the shipped '
                         'text/descriptions/<benchmark>.yaml. Its SHA-256 is recorded')
    if stage == 'train':
        g = parser.add_argument_group('CD-TG plug-in')
        g.add_argument('--cdtg', action='store_true', help='attach the CD-TG text-guidance plug-in to the method')
        g.add_argument('--clip', type=str, default='ViT-B-32', choices=CLIP_MODELS, help='CLIP text encoder')
        g.add_argument('--clip-weights', type=str, default='openai',
                       help='openai (download) | none (random; tests) | PATH to a local copy of the OpenAI weights')
        g.add_argument('--cdtg-attn', type=str, default='paper', choices=ATTN_MODES,
                       help='paper: the reference attention in its exact closed form (one text vector); '
                            'attributes: cross-attention of every pixel over the caption and attribute sentences')
        g.add_argument('--alpha', type=float, default=0.7,
                       help='image weight of the fusion (text: 1 - alpha), 0.7 as the reference code')
        g.add_argument('--fusion', type=str, default='fixed', choices=FUSIONS,
                       help='fixed alpha (the paper); learned: a per-level sigmoid gate initialised at --alpha; '
                            'gated (prototype hosts): FP + g(1-alpha)(FP_t - FP) with a learned per-level g = 0 at '
                            'start (the host\'s own prototypes), g = 1 being the paper\'s fusion')
        g.add_argument('--cdtg-text-bias', type=str, default='bounded', choices=TEXT_BIASES,
                       help='bounded (default, ours): LayerNorm(F + s sigma_F u(t)/rms(u)), bias-free text layers and '
                            'a learned share s of each pixel\'s feature scale; template: the reference\'s unbounded '
                            'LayerNorm(F + u(t)) with biases (for reproduction)')
        bounded(g, '--cdtg-text-ratio', float, TEXT_RATIO, low=0, high=MAX_TEXT_RATIO, low_open=True,
                help='bounded text bias: initial ||u|| / ||F|| per pixel (learned; never above 1)')
        g.add_argument('--cdtg-text', type=str, default='descriptions', choices=TEXT_SOURCES,
                       help='descriptions (default); random: seeded random embeddings instead of the texts; '
                            'shuffled: each class gets another class\'s description (a seeded derangement) -- the '
                            'two controls of scripts/ablations/sanity.sh')
        bounded(g, '--cdtg-lr-scale', float, None, low=0, low_open=True,
                help="learning rate of the plug-in's own optimiser group, as a multiple of the host's base "
                     f"learning rate (the host's schedule applies to it too); default {LR_SCALES['adam']:g} on Adam "
                     f"hosts (hsnet, patnet, dmtnet), {LR_SCALES['sgd']:g} on SGD hosts (pmms, rpmms, qnet, ifa)")
        bounded(g, '--cdtg-weight-decay', float, WEIGHT_DECAY, low=0,
                help="decoupled weight decay of the plug-in's group (AdamW-style on Adam hosts; SGD's own decay on "
                     'SGD hosts)')
        bounded(g, '--cdtg-grad-clip', float, GRAD_CLIP, low=0,
                help="clip the gradient norm of the plug-in's parameters to this, before the host's own clipping "
                     '(0 = off)')
        g.add_argument('--cdtg-features', action='store_true',
                       help='prototype hosts: also feed the text-aligned maps alpha F + (1-alpha) A(F) into the '
                            'host\'s matching (the paper\'s framework figure; default: only prototypes are '
                            'fused, as the released code)')
        g.add_argument('--cdtg-width', type=int, default=None, metavar='W',
                       help='align every level in one shared W-d space (e.g. 512, as the reference) with per-level '
                            'projections, instead of per-level modules of the level\'s width (default)')
        g.add_argument('--cdtg-background', type=str, default='domain', choices=BACKGROUNDS,
                       help='caption of the background prototype: domain (each benchmark\'s own, default) or '
                            'generic (the reference\'s single caption for every dataset)')
        g.add_argument('--descriptions', type=str, default=None, metavar='FILE', help=descriptions_help)
        g.add_argument('--no-style-aug', action='store_true',
                       help='disable the medical-style feature augmentation of support features during training')
        g.add_argument('--text-lora', type=int, default=0, metavar='R',
                       help='rank of trainable LoRA adapters on the CLIP text transformer (0 = frozen, cached '
                            'text)')
        g.add_argument('--text-cache', type=str, default=None,
                       help='folder of the frozen text-embedding cache (default ~/.cache/cdtg/text-embeddings, or '
                            '$CDTG_CACHE/text-embeddings)')
        return
    g = parser.add_argument_group('CD-TG plug-in (rebuilt from the checkpoint)')
    g.add_argument('--cdtg', action='store_true', help='assert that the checkpoint carries the CD-TG plug-in')
    g.add_argument('--alpha', type=float, default=None,
                   help='override the image weight of a fixed-fusion prototype plug-in (an analysis on test '
                        'episodes, not a way to choose alpha; refused for HSNet, where alpha has no image-weight '
                        'meaning)')
    g.add_argument('--clip-weights', type=str, default=None,
                   help='where the CLIP weights are on this machine (must be the weights used in training)')
    g.add_argument('--text-cache', type=str, default=None, help='folder of the frozen text-embedding cache')
    g.add_argument('--descriptions', type=str, default=None, metavar='FILE', help=descriptions_help)

r"""The CD-TG plug-in's command-line flags and the names they choose from, without torch (text/plugin.py uses them;
train.py/test.py -h and argument errors need nothing more)."""
import argparse

CLIP_MODELS = ('RN50', 'ViT-B-32', 'ViT-B-16')
ATTN_MODES = ('paper', 'attributes')
FUSIONS = ('fixed', 'learned')
BACKGROUNDS = ('domain', 'generic')


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
                       help='fixed alpha, or a learned per-level gate initialised at --alpha')
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

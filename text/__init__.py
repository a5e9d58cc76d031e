r"""CD-TG text side: class descriptions (Text Generation Unit), CLIP text encoding and the semantic-guided plug-in."""
import argparse

from common.errors import UserError
from text.plugin import ATTN_MODES, CDTG, FUSIONS, CDTGConfig

__all__ = ['CDTG', 'CDTGConfig', 'add_cdtg_args', 'build_plugin', 'plugin_config']


def add_cdtg_args(parser: argparse.ArgumentParser) -> None:
    r"""train.py flags of the plug-in (they are saved in the checkpoint and rebuilt by test.py)."""
    g = parser.add_argument_group('CD-TG plug-in')
    g.add_argument('--cdtg', action='store_true', help='attach the CD-TG text-guidance plug-in to the method')
    g.add_argument('--clip', type=str, default='ViT-B-32', help='CLIP text encoder: RN50 | ViT-B-32 | ViT-B-16')
    g.add_argument('--clip-weights', type=str, default='openai',
                   help='openai (download) | none (random; tests) | PATH to a local copy of the OpenAI weights')
    g.add_argument('--cdtg-attn', type=str, default='paper', choices=ATTN_MODES,
                   help='paper: the reference attention in its exact closed form (one text vector); attributes: '
                        'cross-attention of every pixel over the caption and attribute sentences')
    g.add_argument('--alpha', type=float, default=0.7, help='image weight of the prototype fusion (text: 1 - alpha)')
    g.add_argument('--fusion', type=str, default='fixed', choices=FUSIONS,
                   help='fixed alpha, or a learned per-level gate initialised at --alpha')
    g.add_argument('--no-style-aug', action='store_true',
                   help='disable the medical-style feature augmentation of support features during training')
    g.add_argument('--text-lora', type=int, default=0, metavar='R',
                   help='rank of trainable LoRA adapters on the CLIP text transformer (0 = frozen, cached text)')
    g.add_argument('--text-cache', type=str, default=None,
                   help='folder of the frozen text-embedding cache (default ~/.cache/cdtg/text-embeddings, or '
                        '$CDTG_CACHE/text-embeddings)')


def plugin_config(config: dict) -> CDTGConfig:
    r"""The plug-in configuration recorded in a run configuration (train.py's flags)."""
    return CDTGConfig(clip=config['clip'], clip_weights=config['clip_weights'], attn=config['cdtg_attn'],
                      alpha=float(config['alpha']), fusion=config['fusion'], style_aug=not config['no_style_aug'],
                      text_lora=int(config['text_lora']), text_cache=config.get('text_cache'),
                      seed=int(config.get('seed', 0))).validate()


def build_plugin(config: dict, model) -> CDTG:
    r"""A CD-TG plug-in sized for `model` (a FewShotSegmenter); attach it with `model.attach(plugin)`."""
    point = getattr(model, 'plugin_point', None)
    if point not in ('features', 'prototypes'):
        raise UserError(f'method {type(model).__name__} declares no CD-TG plug-in point')
    return CDTG(model.feature_channels, model.feature_levels, point, plugin_config(config))

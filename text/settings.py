r"""The CD-TG plug-in's settings, in one torch-free place: the `CDTGConfig` dataclass declares every setting once
(default, flag, help, allowed values); train.py's and test.py's flags are generated from its fields, it validates
itself from the same declarations, and a checkpoint stores it once (its plug-in record). `CDTGPlugin` is the glue
engine/factory.py composes a method with (flags, settings from a command line or a checkpoint, test-time overrides,
building the nn.Module); text/plugin.py holds the module itself.
"""
import argparse
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

from common.config import bounded
from common.errors import UserError



@dataclass(frozen=True)
class TextEncoderSpec:
    r"""A text encoder `--clip` can name: what it is built from and where its published weights come from.

    Args:
        family: 'openai' (OpenAI's CLIP, open_clip's own config), 'biomedclip' (open_clip's CustomTextCLIP text tower:
            PubMedBERT + MLP projection, config shipped in text/encoders/biomedclip/) or 'pubmedclip' (OpenAI's
            ViT-B/32 CLIP text transformer with weights converted from the `transformers` CLIPModel format).
        architecture: the open_clip model config whose text tower is built.
        dim: embedding width. context: the tokenizer's context length (longer texts are truncated, with a warning).
        tokenizer: what turns text into tokens. activation: of the text transformer.
        hub: the Hugging Face hub repository of the published weights (`--clip-weights openai` or `hub`; OpenAI's
            CLIP weights as open_clip fetches them).
    """
    family: str
    architecture: str
    dim: int
    context: int
    tokenizer: str
    activation: str
    hub: str


TEXT_ENCODERS = {
    'RN50': TextEncoderSpec('openai', 'RN50', 1024, 77, 'CLIP BPE (open_clip)', 'quickgelu',
                            'timm/resnet50_clip.openai'),
    'ViT-B-32': TextEncoderSpec('openai', 'ViT-B-32', 512, 77, 'CLIP BPE (open_clip)', 'quickgelu',
                                'timm/vit_base_patch32_clip_224.openai'),
    'ViT-B-16': TextEncoderSpec('openai', 'ViT-B-16', 512, 77, 'CLIP BPE (open_clip)', 'quickgelu',
                                'timm/vit_base_patch16_clip_224.openai'),
    'biomedclip': TextEncoderSpec('biomedclip', 'BiomedCLIP-PubMedBERT_256-vit_base_patch16_224', 512, 256,
                                  'PubMedBERT WordPiece, uncased', 'gelu',
                                  'microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224'),
    'pubmedclip': TextEncoderSpec('pubmedclip', 'ViT-B-32', 512, 77, 'CLIP BPE (open_clip)', 'quickgelu',
                                  'flaviagiammarino/pubmed-clip-vit-base-patch32'),
}
CLIP_MODELS = tuple(TEXT_ENCODERS)
#: `--clip-weights` values that mean "the encoder's published weights, downloaded" ('openai' is the historical name).
PUBLISHED_WEIGHTS = ('openai', 'hub')
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
#: The reference's single background caption for every dataset (Lilacis/CD_TG clip_prompts/background.json): the
#: background text of `--cdtg-background generic`, and predict.py's default background beside a one-off
#: `--description`.
GENERIC_BACKGROUND = ('A photo of the background, representing regions without specific anatomical structures or '
                      'target objects, often appearing uniform or low-textured.')
DESCRIPTIONS_HELP = ("description file (text/descriptions layout, e.g. written by scripts/import_captions.py from the "
                     "reference's captions) for the benchmark it declares; default: the shipped "
                     'text/descriptions/<benchmark>.yaml. Its SHA-256 is recorded')


def setting(default, flag: str | None = None, help: str = '', *, choices: tuple | None = None,
            bounds: tuple | None = None, test_help: str | None = None, legacy=MISSING, metavar: str | None = None):
    r"""A field of `CDTGConfig` with its command-line declaration.

    Args:
        flag: train.py's flag (None: not a flag, set by the run). A boolean setting whose flag starts with '--no-'
            stores the negation (`--no-style-aug` sets style_aug False).
        choices / bounds: the allowed values, or the range (low, high, low_open) of a number.
        test_help: test.py may override the setting on a loaded checkpoint; this is the help of that flag.
        legacy: the value of a run saved before the setting existed (default: `default`).
    """
    meta = {'flag': flag, 'help': help, 'choices': choices, 'bounds': bounds, 'test_help': test_help,
            'legacy': default if legacy is MISSING else legacy, 'metavar': metavar}
    return field(default=default, metadata=meta)


@dataclass
class CDTGConfig:
    r"""Everything that defines the plug-in (saved in checkpoints): its form, its text, and its optimiser group."""
    clip: str = setting('ViT-B-32', '--clip', 'text encoder: OpenAI CLIP RN50 / ViT-B-32 / ViT-B-16, BiomedCLIP '
                        '(PubMedBERT text tower) or PubMedCLIP (CLIP ViT-B/32 fine-tuned on ROCO); see docs/cdtg.md',
                        choices=CLIP_MODELS)
    clip_weights: str = setting(
        'openai', '--clip-weights', "openai or hub (the encoder's published weights, downloaded on first use) | none "
        '(random; tests) | PATH to a local copy (a weight file, or for biomedclip/pubmedclip the downloaded hub '
        'folder)', test_help='where the text-encoder weights are on this machine (must be the weights used in '
        'training)')
    attn: str = setting(
        'paper', '--cdtg-attn', 'paper: the reference attention in its exact closed form (one text vector); '
        'attributes: cross-attention of every pixel over the caption and attribute sentences', choices=ATTN_MODES)
    alpha: float = setting(
        0.7, '--alpha', 'image weight of the fusion (text: 1 - alpha), 0.7 as the reference code', bounds=(0, 1, False),
        test_help='override the image weight of a fixed-fusion prototype plug-in (an analysis on test episodes, not '
                  'a way to choose alpha; refused for HSNet, where alpha has no image-weight meaning)')
    fusion: str = setting(
        'fixed', '--fusion', "fixed alpha (the paper); learned: a per-level sigmoid gate initialised at --alpha; "
        "gated (prototype hosts): FP + g(1-alpha)(FP_t - FP) with a learned per-level g = 0 at start (the host's own "
        "prototypes), g = 1 being the paper's fusion", choices=FUSIONS)
    style_aug: bool = setting(
        True, '--no-style-aug', 'disable the medical-style feature augmentation of support features during training')
    style_strength: float = setting(0.3)
    text_lora: int = setting(
        0, '--text-lora', 'rank of trainable LoRA adapters on the CLIP text transformer (0 = frozen, cached text)',
        bounds=(0, None, False), metavar='R')
    text_cache: str | None = setting(
        None, '--text-cache', 'folder of the frozen text-embedding cache (default ~/.cache/cdtg/text-embeddings, or '
        '$CDTG_CACHE/text-embeddings)', test_help='folder of the frozen text-embedding cache')
    seed: int = setting(0)                          # the run's seed (text controls, random CLIP weights)
    maps: bool = setting(
        False, '--cdtg-features', "prototype hosts: also feed the text-aligned maps alpha F + (1-alpha) A(F) into the "
        "host's matching (the paper's framework figure; default: only prototypes are fused, as the released code)")
    width: int | None = setting(
        None, '--cdtg-width', "align every level in one shared W-d space (e.g. 512, as the reference) with per-level "
        "projections, instead of per-level modules of the level's width (default)", metavar='W')
    background: str = setting(
        'domain', '--cdtg-background', "caption of the background prototype: domain (each benchmark's own, default) "
        "or generic (the reference's single caption for every dataset)", choices=BACKGROUNDS)
    descriptions: str | None = setting(None, '--descriptions', DESCRIPTIONS_HELP, metavar='FILE',
                                       test_help=DESCRIPTIONS_HELP)
    text_bias: str = setting(
        'bounded', '--cdtg-text-bias', "bounded (default, ours): LayerNorm(F + s sigma_F u(t)/rms(u)), bias-free text "
        "layers and a learned share s of each pixel's feature scale; template: the reference's unbounded "
        "LayerNorm(F + u(t)) with biases (for reproduction)", choices=TEXT_BIASES,
        legacy='template')                          # runs saved before the bounded form existed
    text_ratio: float = setting(
        TEXT_RATIO, '--cdtg-text-ratio', 'bounded text bias: initial ||u|| / ||F|| per pixel (learned; never above 1)',
        bounds=(0, MAX_TEXT_RATIO, True))
    text: str = setting(
        'descriptions', '--cdtg-text', "descriptions (default); random: seeded random embeddings instead of the "
        "texts; shuffled: each class gets another class's description (a seeded derangement) -- the two controls of "
        'scripts/ablations/sanity.sh', choices=TEXT_SOURCES)
    lr_scale: float | None = setting(
        None, '--cdtg-lr-scale', "learning rate of the plug-in's own optimiser group, as a multiple of the host's "
        f"base learning rate (the host's schedule applies to it too); default {LR_SCALES['adam']:g} on Adam hosts "
        f"(hsnet, patnet, dmtnet), {LR_SCALES['sgd']:g} on SGD hosts (pmms, rpmms, qnet, ifa)",
        bounds=(0, None, True))
    weight_decay: float = setting(
        WEIGHT_DECAY, '--cdtg-weight-decay', "decoupled weight decay of the plug-in's group (AdamW-style on Adam "
        "hosts; SGD's own decay on SGD hosts)", bounds=(0, None, False))
    grad_clip: float = setting(
        GRAD_CLIP, '--cdtg-grad-clip', "clip the gradient norm of the plug-in's parameters to this, before the host's "
        'own clipping (0 = off)', bounds=(0, None, False))

    def __post_init__(self):
        for f in fields(self):                  # a whole number given for a real-valued setting (YAML, older runs)
            value = getattr(self, f.name)
            if _kind(f) is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))

    def validate(self) -> 'CDTGConfig':
        r"""Every setting against its declaration (choices, range), then the rules between settings; errors name
        the flag."""
        for f in fields(self):
            _check_setting(f, getattr(self, f.name))
        if self.fusion == 'learned' and not 0.0 < self.alpha < 1.0:
            raise UserError('--fusion learned initialises a sigmoid gate at --alpha, which must lie in (0, 1)')
        if self.width is not None and (self.width < 8 or self.width % 8):
            raise UserError(f'--cdtg-width must be a multiple of 8 (the attention heads), e.g. 512 (got {self.width})')
        if self.text_ratio >= MAX_TEXT_RATIO:
            raise UserError(f'--cdtg-text-ratio must lie in (0, {MAX_TEXT_RATIO:g}) (got {self.text_ratio})')
        if self.text_bias == 'template' and self.text_ratio != TEXT_RATIO:
            raise UserError('--cdtg-text-ratio sets the share of the bounded text bias; the template\'s u is '
                            'unbounded and has none (drop --cdtg-text-ratio, or use --cdtg-text-bias bounded)')
        if self.text == 'random' and self.text_lora:
            raise UserError('--cdtg-text random replaces the text embeddings, so --text-lora would train adapters '
                            'that nothing reads; use one of them')
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _name(f) -> str:
    return f.metadata.get('flag') or f.name


def _kind(f) -> type:
    r"""The type of a setting: its annotation, without the None of an optional setting."""
    kinds = [k for k in typing.get_args(f.type) if k is not type(None)] or [f.type]
    return kinds[0]


def _check_setting(f, value) -> None:
    meta, name = f.metadata, _name(f)
    kind = _kind(f)
    if value is None:
        if f.default is not None:
            raise UserError(f'{name} must be set (got None)')
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f'{name} must be true or false, got {value!r}')
        return
    if kind in (int, float):
        numeric = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
        if not numeric:
            raise UserError(f'{name} must be {"an integer" if kind is int else "a number"}, got {value!r}')
        if not math.isfinite(value):
            raise UserError(f'{name} must be a finite number, got {value!r}')
    elif not isinstance(value, kind):
        raise UserError(f'{name} must be a {kind.__name__}, got {value!r}')
    if meta.get('choices') and value not in meta['choices']:
        raise UserError(f'{name} {value!r}: choose one of {", ".join(meta["choices"])}')
    if meta.get('bounds'):
        low, high, low_open = meta['bounds']
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            side = f'{"(" if low_open else "["}{low:g}, {high:g}]' if high is not None else \
                f'{">" if low_open else ">="} {low:g}'
            raise UserError(f'{name} must lie in {side} (got {value!r})' if high is not None else
                            f'{name} must be {side} (got {value!r})')


def _flag_fields(stage: str) -> list:
    return [f for f in fields(CDTGConfig) if f.metadata.get('flag') and (stage == 'train' or f.metadata['test_help'])]


def dest(f) -> str:
    r"""The argparse destination of a setting's flag (also its key in YAML defaults and in older checkpoints)."""
    return f.metadata['flag'][2:].replace('-', '_')


def add_args(parser: argparse.ArgumentParser, stage: str) -> None:
    r"""The plug-in's flags, generated from `CDTGConfig`: all of them for train.py (saved in the checkpoint), the
    test-time overrides for test.py (default None: the checkpoint's value)."""
    train = stage == 'train'
    g = parser.add_argument_group('CD-TG plug-in' if train else 'CD-TG plug-in (rebuilt from the checkpoint)')
    g.add_argument('--cdtg', action='store_true', help='attach the CD-TG text-guidance plug-in to the method' if train
                   else 'assert that the checkpoint carries the CD-TG plug-in')
    for f in _flag_fields(stage):
        meta, flag = f.metadata, f.metadata['flag']
        default = f.default if train else None
        text = meta['help'] if train else meta['test_help']
        if _kind(f) is bool:
            g.add_argument(flag, action='store_true', help=text)
        elif meta['bounds']:
            low, high, low_open = meta['bounds']
            bounded(g, flag, _kind(f), default, low=low, high=high, low_open=low_open, help=text).metavar = \
                meta['metavar']
        else:
            g.add_argument(flag, type=_kind(f), default=default, choices=meta['choices'], help=text,
                           metavar=meta['metavar'])


def _from_flag(f, value):
    return not value if f.metadata['flag'].startswith('--no-') else value


class CDTGPlugin:
    r"""The glue between the CD-TG module and a run (the plug-in protocol of engine/factory.py)."""
    name, label = 'cdtg', 'CD-TG'
    settings_class = CDTGConfig
    add_args = staticmethod(add_args)

    @staticmethod
    def from_flags(values: dict, seed: int) -> CDTGConfig | None:
        r"""The settings a command line (train.py's flags as a dict) asks for; None without --cdtg."""
        if not values.get('cdtg'):
            return None
        given = {f.name: _from_flag(f, values[dest(f)]) for f in _flag_fields('train') if dest(f) in values}
        return CDTGConfig(**given, seed=seed).validate()

    @staticmethod
    def from_saved(config: dict, saved: dict | None) -> CDTGConfig | None:
        r"""The settings of a saved run: its plug-in record (`saved`, checkpoints of this version) or, for runs
        saved before the settings had their own section, the flat keys of its configuration, with the legacy
        value of a setting it does not record. None when the run has no plug-in."""
        if not config.get('cdtg'):
            return None
        if isinstance(config['cdtg'], dict):
            saved = config['cdtg']
        if saved is not None:
            known = {f.name for f in fields(CDTGConfig)}
            values = {f.name: f.metadata['legacy'] for f in fields(CDTGConfig)}
            values.update({k: v for k, v in saved.items() if k in known})
            return CDTGConfig(**values).validate()
        if not any(dest(f) in config for f in _flag_fields('train')):
            raise UserError('this run configuration attaches CD-TG but holds none of its settings: they are in its '
                            "checkpoint's plug-in record (build the model from the checkpoint, engine/factory.py "
                            'load_model)')
        values = {f.name: f.metadata['legacy'] for f in fields(CDTGConfig)}
        for f in _flag_fields('train'):
            if dest(f) in config and config[dest(f)] is not None:
                values[f.name] = _from_flag(f, config[dest(f)])
        values['seed'] = int(config.get('seed', 0))
        return CDTGConfig(**values).validate()

    @staticmethod
    def to_flags(settings: CDTGConfig | None) -> dict:
        r"""The train.py flag values (argparse destinations) that give `settings` (the inverse of `from_flags`);
        empty for a run without the plug-in."""
        if settings is None:
            return {}
        return {'cdtg': True, **{dest(f): _from_flag(f, getattr(settings, f.name)) for f in _flag_fields('train')}}

    @staticmethod
    def test_overrides(settings: CDTGConfig | None, args: argparse.Namespace, path: str,
                       method: str) -> CDTGConfig | None:
        r"""A checkpoint's settings with test.py's plug-in flags applied (and checked). The descriptions are test.py's
        own: `--descriptions FILE` (for the tested benchmark) or the shipped ones."""
        if getattr(args, 'cdtg', False) and settings is None:
            raise UserError(f'checkpoint {path} was trained without the CD-TG plug-in, so --cdtg cannot be used with '
                            'it (drop --cdtg, or train with train.py --cdtg)')
        given = {f: getattr(args, dest(f), None) for f in _flag_fields('test')}
        given = {f: v for f, v in given.items() if v is not None}
        if settings is None:
            if given:
                raise UserError(f'{next(iter(given)).metadata["flag"]} applies to CD-TG checkpoints only; {path} has '
                                'no plug-in')
            return None
        values = settings.to_dict()
        for f, value in given.items():
            if f.name == 'alpha':
                _check_alpha_override(settings, path, method)
            if f.name == 'descriptions':
                from text.descriptions import load_description_file
                declared = load_description_file(value).benchmark
                if declared != args.benchmark:
                    raise UserError(f'--descriptions {value} describes benchmark {declared!r}, but test.py runs '
                                    f'{args.benchmark!r}; pass the file written for {args.benchmark!r}')
            values[f.name] = value
        values['descriptions'] = getattr(args, 'descriptions', None)
        return CDTGConfig(**values).validate()

    @staticmethod
    def build(settings: CDTGConfig, model):
        r"""The plug-in module sized for `model` (a FewShotSegmenter)."""
        from text.plugin import CDTG
        if settings.maps:      # the feature hooks align the backbone taps, which a prototype host may reduce later
            return CDTG(list(model.backbone.channels), list(model.backbone.stage_ids), model.plugin_point, settings)
        return CDTG(model.feature_channels, model.feature_levels, model.plugin_point, settings)


def _check_alpha_override(settings: CDTGConfig, path: str, method: str) -> None:
    from model import method_class
    if settings.fusion in ('learned', 'gated'):
        raise UserError(f'--alpha cannot override {path}: its fusion weights were learned (--fusion '
                        f'{settings.fusion})')
    if method_class(method).plugin_point == 'features':
        raise UserError(f'--alpha cannot override {path}: on {method} the plug-in is a learned residual gate '
                        'F + g(1-alpha)(A(F) - F), so alpha only rescales the learned g and has no image-weight '
                        'meaning (an override would run the model off its training distribution)')

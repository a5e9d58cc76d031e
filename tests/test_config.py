r"""The typed run configuration and the plug-in's settings: one declaration per setting (its flag, default, range and
validation generated from the dataclass field), saved once, and old flat configurations read as they were trained."""
import argparse
import dataclasses

import pytest

import predict
import test as test_cli
import train as train_cli
from common.errors import UserError
from engine.config import LEGACY, ModelConfig, TrainConfig
from model import BACKBONES, method_class, train_recipe
from text.settings import GENERIC_BACKGROUND, CDTGConfig, CDTGPlugin, dest

FLAG_FIELDS = [f for f in dataclasses.fields(CDTGConfig) if f.metadata['flag']]


def flags_of(parser: argparse.ArgumentParser) -> dict:
    return {a.option_strings[-1]: a for a in parser._actions if a.option_strings}


def test_every_setting_is_one_train_flag_with_the_fields_default_and_range():
    flags = flags_of(train_cli.build_parser('patnet'))
    for f in FLAG_FIELDS:
        action = flags[f.metadata['flag']]
        if f.metadata['flag'].startswith('--no-'):
            assert action.default is False and action.const is True      # --no-style-aug: True means style_aug off
        else:
            assert action.default == f.default, f.name
        assert getattr(action, 'bounds', None) == f.metadata['bounds'], f.name
        assert (tuple(action.choices) if action.choices else None) == f.metadata['choices'], f.name
    # test.py overrides exactly the settings that declare a test help, defaulting to the checkpoint's value
    test_flags = flags_of(test_cli.build_parser())
    overridable = {f.metadata['flag'] for f in FLAG_FIELDS if f.metadata['test_help']}
    assert overridable == {'--alpha', '--clip-weights', '--text-cache', '--descriptions'}
    assert all(test_flags[flag].default is None for flag in overridable)
    assert not ({f.metadata['flag'] for f in FLAG_FIELDS} - overridable) & set(test_flags)


def test_the_alpha_range_is_checked_on_the_command_line_and_when_built():
    with pytest.raises(UserError, match=r'--alpha must be a number in \[0, 1\], got 1.5'):
        from common.config import parse_with_config
        parse_with_config(train_cli.build_parser('patnet'), ['--cdtg', '--alpha', '1.5'])
    with pytest.raises(UserError, match=r'--alpha must lie in \[0, 1\] \(got -0.1\)'):
        CDTGConfig(alpha=-0.1).validate()
    with pytest.raises(UserError, match='--cdtg-attn'):
        CDTGConfig(attn='nope').validate()
    with pytest.raises(UserError, match='--text-lora must be an integer'):
        CDTGConfig(text_lora=1.5).validate()
    assert CDTGConfig(alpha=1).alpha == 1.0 and isinstance(CDTGConfig(alpha=1).alpha, float)


def test_flags_to_settings_and_back():
    args = train_cli.build_parser('patnet').parse_args(
        ['--cdtg', '--alpha', '0.4', '--no-style-aug', '--cdtg-attn', 'attributes', '--cdtg-width', '64',
         '--cdtg-lr-scale', '0.5', '--seed', '3'])
    settings = CDTGPlugin.from_flags(vars(args), args.seed)
    assert (settings.alpha, settings.style_aug, settings.attn, settings.width, settings.lr_scale, settings.seed) == \
        (0.4, False, 'attributes', 64, 0.5, 3)
    flags = CDTGPlugin.to_flags(settings)
    assert all(flags[dest(f)] == getattr(args, dest(f)) for f in FLAG_FIELDS)
    assert CDTGPlugin.from_flags(vars(train_cli.build_parser('patnet').parse_args([])), 0) is None
    assert CDTGPlugin.to_flags(None) == {}


def test_an_old_flat_configuration_reads_as_the_record_of_the_same_run():
    flat = {'method': 'patnet', 'backbone': 'resnet50', 'cdtg': True, 'clip': 'ViT-B-32', 'clip_weights': 'none',
            'cdtg_attn': 'paper', 'alpha': 0.6, 'fusion': 'fixed', 'no_style_aug': True, 'text_lora': 0, 'seed': 2}
    old = ModelConfig.from_saved(flat)
    # keys added since read with their legacy value: the template text bias of the runs before the bounded form
    assert old.plugin('cdtg').text_bias == 'template' and old.plugin('cdtg').style_aug is False
    record = {'name': 'cdtg', 'config': old.plugin('cdtg').to_dict()}
    new = ModelConfig.from_saved({'method': 'patnet', 'backbone': 'resnet50', 'cdtg': True}, record)
    assert new == old
    assert ModelConfig.from_saved({'method': 'patnet', 'backbone': 'resnet50'}).plugins == {}
    with pytest.raises(UserError, match="plug-in record"):
        ModelConfig.from_saved({'method': 'patnet', 'backbone': 'resnet50', 'cdtg': True})


def test_a_run_configuration_round_trips_and_stores_the_plugin_settings_once():
    parser = train_cli.build_parser('pmms')
    args = parser.parse_args(['--method', 'pmms', '--benchmark', 'synthetic', '--lung-subset', 'all', '--cdtg',
                              '--alpha', '0.5', '--epochs', '3'])
    config = TrainConfig.from_args(args, train_recipe('pmms', 1), '/tmp/run')
    assert set(config.recipe_from_method) == {k for k, v in train_recipe('pmms', 1).items()
                                              if getattr(args, k) is None}
    assert config.epochs == 3 and 'epochs' not in config.recipe_from_method
    assert config.data.options['lung_subset'] == 'all' and config.model.backbone == 'resnet50'
    saved = config.to_dict(checkpoint=True)
    assert saved['cdtg'] is True and 'alpha' not in saved and 'no_style_aug' not in saved
    assert saved['lung_subset'] == 'all' and saved['method_options'] == config.model.method_options
    # the checkpoint's keys: train.py's flags, less --resume, the method's options (their own section) and the
    # plug-in's settings (its record), plus the two sections
    options = {f.name for f in dataclasses.fields(method_class('pmms').Options)}
    expected = set(vars(args)) - {'resume'} - options - {dest(f) for f in FLAG_FIELDS}
    assert set(saved) == expected | {'recipe_from_method', 'method_options'}
    back = TrainConfig.from_saved(saved, {'name': 'cdtg', 'config': config.model.plugin('cdtg').to_dict()},
                                  strict=True)
    assert back == config
    assert config.to_dict()['cdtg'] == config.model.plugin('cdtg').to_dict()      # config.yaml: the section


def test_a_resumed_run_lacking_a_key_is_refused_but_an_evaluated_one_reads_none():
    saved = {'method': 'hsnet', 'benchmark': 'synthetic', 'datapath': 'd', 'nshot': 1, 'img_size': 64,
             'backbone': 'resnet50', 'logpath': 'x', 'backbone_weights': 'none', 'bn_calibration': 0, 'bsz': 2,
             'epochs': 1, 'seed': 0, 'lr': None, 'episodes_per_epoch': None}
    with pytest.raises(UserError, match='lacks val_episodes'):
        TrainConfig.from_saved(saved, strict=True)
    loose = TrainConfig.from_saved(saved)
    assert loose.val_episodes is None and loose.augmentation == LEGACY['augmentation'] == 'none'
    assert loose.train_boundary == 'ignore'                 # what runs did before the flag existed


def test_predict_and_the_plugin_share_one_generic_background():
    assert predict.GENERIC_BACKGROUND is GENERIC_BACKGROUND
    import text.plugin
    assert text.plugin.GENERIC_BACKGROUND is GENERIC_BACKGROUND


def test_name_lists_are_declared_once_in_the_torch_free_module():
    from common import names
    from data.augment import AUGMENTATIONS
    from engine.loops import PRECISIONS
    from engine.protocols import PROTOCOLS
    from model.backbone import _SPECS
    import torch
    assert PRECISIONS == {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
    assert list(PROTOCOLS) == list(names.PROTOCOLS) and PROTOCOLS['volumetric'].name == 'volumetric'
    assert [type(a).__name__ if a else None for a in AUGMENTATIONS.values()] == list(names.AUGMENTATIONS.values())
    assert tuple(_SPECS) == BACKBONES and _SPECS['resnet50-deep'][1] is None and _SPECS['resnet101'][2][2] == 23


def test_a_method_must_declare_its_kshot_policy_and_plugin_point():
    from model import FewShotSegmenter
    from model.backbone import Backbone

    class Bare(FewShotSegmenter):
        def match(self, record):
            raise NotImplementedError

    class VoteOnly(Bare):
        kshot = 'vote'

    backbone = Backbone('resnet50', 'none')
    with pytest.raises(TypeError, match='method Bare must declare kshot'):
        Bare(backbone)
    with pytest.raises(TypeError, match="method VoteOnly must declare plugin_point as one of features, prototypes"):
        VoteOnly(backbone)
    VoteOnly.plugin_point = 'features'
    assert VoteOnly(backbone).policy is not None


def test_benchmark_options_are_the_flags_the_benchmarks_declare():
    from data import DATASETS, add_dataset_args, dataset_class, dataset_options
    parser = argparse.ArgumentParser()
    add_dataset_args(parser)
    flags = flags_of(parser)
    declared = set()
    for name in DATASETS:
        cls = dataset_class(name)
        for option in {**cls.options, **cls.switches}:
            declared.add(option)
            groups = flags['--' + option.replace('_', '-')].help.split('; ')         # 'a/b: help; c: help'
            assert any(name in g.split(':')[0].split('/') for g in groups), (name, option)
    assert set(dataset_options(argparse.Namespace())) == declared == {a.dest for a in flags.values()} - {'help'}
    assert flags['--skip-bad'].const is True and flags['--fold'].type is str


def test_the_random_elliptic_episode():
    from data.synthetic import elliptic_episode
    ep = elliptic_episode(48, 3, batch=2, seed=4)
    again = elliptic_episode(48, 3, batch=2, seed=4)
    assert all((ep[k] == again[k]).all() for k in ep)
    assert ep['support_masks'].shape == (2, 3, 48, 48) and ep['query_mask'].shape == (2, 48, 48)
    masks = ep['support_masks']
    # centres lie in [0.3, 0.7] and radii in [0.15, 0.35] of the side: no ellipse reaches a corner, and each covers
    # between pi 0.15^2 and pi 0.35^2 of the image (less the little a border may cut off)
    assert (masks[..., 0, 0] == 0).all() and (masks[..., -1, -1] == 0).all()
    fraction = masks.mean(dim=(-1, -2))
    assert (fraction > 0.8 * 3.1416 * 0.15 ** 2).all() and (fraction < 3.1416 * 0.35 ** 2 + 0.02).all()
    supports_only = elliptic_episode(48, 3, seed=4, query_mask=False)
    assert 'query_mask' not in supports_only and supports_only['support_masks'].shape == (1, 3, 48, 48)

r"""Assembly: build a method and its plug-ins from a run configuration or a checkpoint, and their command-line flags.

A plug-in (registered in engine/flags.py `PLUGINS`, with its torch-free flag declaration) is a `model.base.Hooks`
subclass that also provides, for this module:
    name, label                       its key in checkpoints ('cdtg') and its name in messages ('CD-TG')
    enabled(config) -> bool           whether a run configuration asks for it
    config_keys() -> tuple            the configuration keys it owns (dropped from runs without it)
    from_config(config, model)        build it for a method
    test_overrides(config, args, path) -> config    apply and check test.py's overrides
    record() -> dict                  what a checkpoint records about it
    check_record(saved, path)         refuse a checkpoint it cannot serve
Methods never import a plug-in; the composition happens here.
"""
import argparse
import dataclasses
import importlib

import torch

from common.checkpoint import content_digest, load_checkpoint
from common.errors import UserError
from engine.flags import PLUGINS, add_method_args, add_plugin_args, preparse_method  # noqa: F401  (re-exported)
from model import FewShotSegmenter, build_method, build_options, method_class, stored_options

def plugin_classes() -> list[type]:
    classes = []
    for target in PLUGINS.values():
        module, name = target['class'].split(':')
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def method_options(method: str, values: dict) -> dict:
    r"""The full, validated options of `method` (defaults where a value is None) as a plain dict."""
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.asdict(build_options(method, given))


# --- models ---------------------------------------------------------------------------------------------------------
def build_model(config: dict, backbone_weights: str | None) -> FewShotSegmenter:
    r"""The model a run configuration describes (method, its options, backbone, plug-ins).
    `backbone_weights=None` leaves the backbone for a checkpoint."""
    model = build_method(config['method'], config.get('backbone'), backbone_weights,
                         **config.get('method_options', {}))
    for cls in plugin_classes():
        if cls.enabled(config):
            model.attach(cls.from_config(config, model))
    return model


def plugin_record(model: FewShotSegmenter) -> dict | None:
    r"""What a checkpoint records about the attached plug-in (None without one)."""
    record = getattr(model.hooks, 'record', None)
    return record() if callable(record) else None


def adaptation_record(model: FewShotSegmenter) -> dict | None:
    r"""The test-time adaptation settings results.json and summary.json record: None for a method without one."""
    return {'steps': model.adaptation.steps, 'lr': model.adaptation.lr} if model.adapts() else None


def strip_plugin_keys(config: dict) -> dict:
    r"""A run configuration without the settings of plug-ins it does not use."""
    config = dict(config)
    for cls in plugin_classes():
        if not cls.enabled(config):
            for key in cls.config_keys():
                config.pop(key, None)
    return config


def frozen_backbone_keys(model: FewShotSegmenter) -> list[str]:
    r"""State-dict keys of the backbone's frozen tensors (parameters without gradient and buffers that training does
    not move)."""
    trainable = {f'backbone.{n}' for n, p in model.backbone.named_parameters() if p.requires_grad}
    trainable |= {f'backbone.{n}' for n in model.backbone.moving_buffers()}
    return [k for k in model.state_dict() if k.startswith('backbone.') and k not in trainable]


def checkpoint_model_state(model: FewShotSegmenter, config: dict) -> tuple[dict, dict | None]:
    r"""(weights to store, backbone identity or None). A frozen backbone that can be rebuilt exactly — torchvision's
    ImageNet weights, BatchNorm statistics not re-estimated — is stored by identity (name + content digest) instead
    of by value (an HSNet checkpoint shrinks from ~125 MB to ~10 MB); anything else (a weights file, BN
    calibration, random weights, fine-tuned layers) is stored."""
    state = model.state_dict()
    if config.get('backbone_weights') != 'imagenet' or config.get('bn_calibration'):
        return state, None
    frozen = frozen_backbone_keys(model)
    identity = {'weights': 'imagenet', 'backbone': config['backbone'],
                'digest': content_digest({k: state[k] for k in frozen})}
    return {k: v for k, v in state.items() if k not in set(frozen)}, identity


def load_model(path: str, device: torch.device, args: argparse.Namespace | None = None,
               expect_plugin: bool | None = None) -> tuple[FewShotSegmenter, dict]:
    r"""Rebuild the model recorded in a checkpoint (method, options, backbone, plug-in) and load its weights.

    Args:
        args: test.py's parsed flags; each plug-in applies (and checks) its test-time overrides from them.
        expect_plugin: False asserts that the checkpoint carries no plug-in.
    Checkpoints written before an option existed load with the behaviour they were trained with (the method's
    `legacy_options`), other missing options with their defaults.
    """
    ckpt = load_checkpoint(path, require_finite=True)
    config = dict(ckpt['config'])
    method_class(config['method'])                               # a clear error for an unknown method
    config['method_options'] = stored_options(config['method'], config.get('method_options'))
    if args is not None:
        for cls in plugin_classes():
            config = cls.test_overrides(config, args, path)
    plugins = [cls for cls in plugin_classes() if cls.enabled(config)]
    if expect_plugin is False and plugins:
        raise UserError(f'checkpoint {path} holds a plug-in ({plugins[0].name}); it cannot be evaluated as a plain '
                        'model')
    identity = ckpt.get('backbone_identity')
    model = build_model(config, 'imagenet' if identity else None)        # stored by identity: rebuild it
    if identity:
        frozen = frozen_backbone_keys(model)
        state = model.state_dict()
        if content_digest({k: state[k] for k in frozen}) != identity['digest']:
            raise UserError(f'checkpoint {path} stores its frozen {identity["backbone"]} backbone by identity (the '
                            'torchvision ImageNet weights), but the weights found on this machine differ from the '
                            'ones it was trained with (another torchvision weights version?); put the original '
                            'weight file in $TORCH_HOME/hub/checkpoints')
        ckpt = dict(ckpt, model={**{k: state[k] for k in frozen}, **ckpt['model']})
    record = plugin_record(model)
    if record is not None:
        model.hooks.check_record(ckpt.get('plugin'), path)
    state = ckpt['model']
    if any(k.startswith('hooks.') for k in state) and record is None:
        raise UserError(f'checkpoint {path} holds plug-in weights but its configuration has no plug-in')
    plugin = f' + {model.hooks.label}' if record else ''
    what = f'method {config["method"]} with backbone {config["backbone"]}{plugin}'
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:                                     # shape mismatches
        detail = ' '.join(line.strip() for line in str(err).splitlines()[1:3])
        raise UserError(f'checkpoint {path} does not fit {what}: {detail}') from err
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f'checkpoint {path} does not fit {what}: missing {_some(result.missing_keys)}, '
                        f'unexpected {_some(result.unexpected_keys)}')
    return model.to(device).eval(), dict(ckpt, config=config)


def _some(keys: list[str]) -> str:
    return '[]' if not keys else f'[{", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""}] ({len(keys)})'

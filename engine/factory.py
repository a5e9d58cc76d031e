r"""Assembly: build a method and its plug-ins from a run configuration or a checkpoint.

A plug-in is registered in engine/flags.py `PLUGINS` by its torch-free spec, which provides, for this module and
engine/config.py:
    name, label                            its key in checkpoints ('cdtg') and its name in messages ('CD-TG')
    add_args(parser, stage)                its flags (train.py: all its settings; test.py: the overrides)
    from_flags(values, seed)               its settings from train.py's flags (None: not asked for)
    from_saved(config, record)             its settings from a saved run (None: the run has none)
    test_overrides(settings, args, path, method)    apply and check test.py's overrides
    build(settings, model)                 the module (a `model.base.Hooks` subclass) for a method
The module provides `record()` (what a checkpoint records about it, its settings under 'config') and
`check_record(saved, path)` (refuse a checkpoint it cannot serve). Methods never import a plug-in; the composition
happens here.
"""
import argparse
from typing import Mapping

import torch

from common.checkpoint import content_digest, load_checkpoint
from common.errors import UserError
from engine.config import ModelConfig, TrainConfig
from engine.flags import plugin_specs
from model import FewShotSegmenter, build_method


# --- models ---------------------------------------------------------------------------------------------------------
def build_model(config: ModelConfig | Mapping, backbone_weights: str | None) -> FewShotSegmenter:
    r"""The model a configuration describes (method, its options, backbone, plug-ins): a `ModelConfig`, or a run
    configuration as a dict (train.py's flat keys; options it lacks take their defaults). `backbone_weights=None`
    leaves the backbone for a checkpoint."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_saved(config, saved=False)
    model = build_method(config.method, config.backbone, backbone_weights, **config.method_options)
    for spec in plugin_specs():
        settings = config.plugin(spec.name)
        if settings is not None:
            model.attach(spec.build(settings, model))
    return model


def plugin_record(model: FewShotSegmenter) -> dict | None:
    r"""What a checkpoint records about the attached plug-in (None without one)."""
    record = getattr(model.hooks, 'record', None)
    return record() if callable(record) else None


def adaptation_record(model: FewShotSegmenter) -> dict | None:
    r"""The test-time adaptation settings results.json and summary.json record: None for a method without one."""
    return {'steps': model.adaptation.steps, 'lr': model.adaptation.lr} if model.adapts() else None


def frozen_backbone_keys(model: FewShotSegmenter) -> list[str]:
    r"""State-dict keys of the backbone's frozen tensors (parameters without gradient and buffers that training does
    not move)."""
    trainable = {f'backbone.{n}' for n, p in model.backbone.named_parameters() if p.requires_grad}
    trainable |= {f'backbone.{n}' for n in model.backbone.moving_buffers()}
    return [k for k in model.state_dict() if k.startswith('backbone.') and k not in trainable]


def checkpoint_model_state(model: FewShotSegmenter, config: TrainConfig) -> tuple[dict, dict | None]:
    r"""(weights to store, backbone identity or None). A frozen backbone that can be rebuilt exactly — torchvision's
    ImageNet weights, BatchNorm statistics not re-estimated — is stored by identity (name + content digest) instead
    of by value (an HSNet checkpoint shrinks from ~125 MB to ~10 MB); anything else (a weights file, BN
    calibration, random weights, fine-tuned layers) is stored."""
    state = model.state_dict()
    if config.backbone_weights != 'imagenet' or config.bn_calibration:
        return state, None
    frozen = frozen_backbone_keys(model)
    identity = {'weights': 'imagenet', 'backbone': config.model.backbone,
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
    try:
        spec = ModelConfig.from_saved(ckpt['config'], ckpt.get('plugin'))
    except UserError as err:
        raise UserError(f'checkpoint {path}: {err}') from err
    if args is not None:
        spec.plugins = {p.name: settings for p in plugin_specs()
                        if (settings := p.test_overrides(spec.plugin(p.name), args, path, spec.method)) is not None}
    if expect_plugin is False and spec.plugins:
        raise UserError(f'checkpoint {path} holds a plug-in ({next(iter(spec.plugins))}); it cannot be evaluated as '
                        'a plain model')
    config = dict(ckpt['config'], method_options=spec.method_options)
    identity = ckpt.get('backbone_identity')
    model = build_model(spec, 'imagenet' if identity else None)          # stored by identity: rebuild it
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
    what = f'method {spec.method} with backbone {spec.backbone}{plugin}'
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

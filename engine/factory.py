r"""Build a method and its optional CD-TG plug-in from a run configuration, or from a checkpoint."""
import torch

from common.checkpoint import load_checkpoint
from common.errors import UserError
from model import FewShotSegmenter, build_method


def build_model(config: dict, backbone_weights: str | None) -> FewShotSegmenter:
    r"""The model a run configuration describes. `backbone_weights=None` leaves the backbone for a checkpoint.
    With `config['cdtg']` the CD-TG plug-in is built and attached through the method's hook interface."""
    model = build_method(config['method'], config['backbone'], backbone_weights)
    if config.get('cdtg'):
        from text import build_plugin          # the composition happens here, never inside a method
        model.attach(build_plugin(config, model))
    return model


def plugin_record(model: FewShotSegmenter) -> dict | None:
    r"""What a checkpoint records about the attached plug-in (None without one)."""
    hooks = model.hooks
    if not hasattr(hooks, 'config'):
        return None
    return {'name': 'cdtg', 'config': hooks.config.to_dict(), 'text_encoder': hooks.identity}


def load_model(path: str, device: torch.device, overrides: dict | None = None,
               expect_cdtg: bool | None = None) -> tuple[FewShotSegmenter, dict]:
    r"""Rebuild the model recorded in a checkpoint (method, backbone, plug-in) and load its weights.

    Args:
        overrides: configuration values to change at test time (e.g. text_cache, alpha, clip_weights); None values
            are ignored.
        expect_cdtg: True/False asserts that the checkpoint was / was not trained with the CD-TG plug-in.
    """
    ckpt = load_checkpoint(path)
    config = dict(ckpt['config'])
    has_cdtg = bool(config.get('cdtg'))
    if expect_cdtg is True and not has_cdtg:
        raise UserError(f'checkpoint {path} was trained without the CD-TG plug-in, so --cdtg cannot be used with it '
                        '(drop --cdtg, or train with train.py --cdtg)')
    if expect_cdtg is False and has_cdtg:
        raise UserError(f'checkpoint {path} holds a CD-TG plug-in; it cannot be evaluated as a plain model')
    for key, value in (overrides or {}).items():
        if value is not None:
            if not has_cdtg:
                raise UserError(f'--{key.replace("_", "-")} applies to CD-TG checkpoints only; {path} has no plug-in')
            if key == 'alpha' and config.get('fusion') == 'learned':
                raise UserError(f'--alpha cannot override {path}: its fusion weights were learned (--fusion learned)')
            config[key] = value
    model = build_model(config, None)
    saved_plugin, plugin = ckpt.get('plugin'), plugin_record(model)
    if plugin is not None and saved_plugin is not None and plugin['text_encoder'] != saved_plugin['text_encoder']:
        raise UserError(f'checkpoint {path} was trained with text encoder {saved_plugin["text_encoder"]}, but '
                        f'--clip-weights now gives {plugin["text_encoder"]}; pass the same CLIP weights')
    state = ckpt['model']
    plugin_keys = [k for k in state if k.startswith('hooks.')]
    if plugin_keys and plugin is None:
        raise UserError(f'checkpoint {path} holds CD-TG plug-in weights but its configuration has no plug-in')
    what = f'method {config["method"]} with backbone {config["backbone"]}{" + CD-TG" if plugin else ""}'
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

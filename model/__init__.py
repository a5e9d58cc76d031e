r"""Method registry: name -> class. Adding a method = one file in model/ plus one line here (see README, "Adding a
method", and the toy prototype method of tests/test_methods.py)."""
import dataclasses
import importlib

from common.errors import UserError
from common.registry import LazyRegistry

METHODS = LazyRegistry({
    'hsnet': 'model.hsnet:HSNet',
    'patnet': 'model.patnet:PATNet',
    'pmms': 'model.pmms:PMMs',
    'rpmms': 'model.pmms:RPMMs',
    'qnet': 'model.qnet:QNet',
    'dmtnet': 'model.dmtnet:DMTNet',
    'ifa': 'model.ifa:IFA',
})

#: The backbones (model/backbone.py builds them; the names are here so that command lines need no torch import).
BACKBONES = ('resnet50', 'resnet101', 'vgg16')

# The interface, imported on first use (PEP 562): `from model import FewShotSegmenter` works as usual.
_EXPORTS = {'Backbone': 'model.backbone', 'BackboneSpec': 'model.backbone', 'Adaptation': 'model.base',
            'EpisodeContext': 'model.base', 'EpisodeRecord': 'model.base', 'FewShotSegmenter': 'model.base',
            'Hooks': 'model.base', 'Output': 'model.base', 'Recipe': 'model.base', 'SupportSet': 'model.base',
            'option': 'model.base'}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f'unknown method {name!r}; choose one of {", ".join(METHODS)}')
    return METHODS[name]


def build_options(name: str, options: dict | None = None):
    r"""The options dataclass of method `name` from a dict (unknown keys are an error naming the valid ones)."""
    cls = method_class(name)
    options = dict(options or {})
    valid = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise UserError(f'{", ".join("--" + k.replace("_", "-") for k in unknown)}: not an option of method {name} '
                        f'(its options: {", ".join(sorted(valid)) or "none"})')
    return cls.Options(**options)


def build_method(name: str, backbone: str | None = None, backbone_weights: str | None = 'imagenet', **options):
    r"""Method `name` on its backbone. `backbone=None` takes the method's default; `backbone_weights=None` builds
    without initialising the backbone (a checkpoint supplies it); `options` are the method's own options."""
    from model.backbone import Backbone
    cls = method_class(name)
    opts = build_options(name, options)
    return cls(Backbone(backbone or cls.default_backbone, backbone_weights, cls.backbone_spec), opts)


__all__ = ['BACKBONES', 'METHODS', 'Adaptation', 'Backbone', 'BackboneSpec', 'EpisodeContext', 'EpisodeRecord',
           'FewShotSegmenter', 'Hooks', 'Output', 'Recipe', 'SupportSet', 'build_method', 'build_options',
           'method_class', 'option']

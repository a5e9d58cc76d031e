r"""Method registry: name -> class. Adding a method = one file in model/ plus one line here (see README, "Adding a
method", and the toy prototype method of tests/test_methods.py)."""
import dataclasses

from common.errors import UserError
from model.backbone import BACKBONES, Backbone, BackboneSpec
from model.base import (Adaptation, EpisodeContext, EpisodeRecord, FewShotSegmenter, Hooks, Output, Recipe,
                        SupportSet, option)
from model.dmtnet import DMTNet
from model.hsnet import HSNet
from model.ifa import IFA
from model.patnet import PATNet
from model.pmms import PMMs, RPMMs
from model.qnet import QNet

METHODS: dict[str, type[FewShotSegmenter]] = {
    'hsnet': HSNet,
    'patnet': PATNet,
    'pmms': PMMs,
    'rpmms': RPMMs,
    'qnet': QNet,
    'dmtnet': DMTNet,
    'ifa': IFA,
}


def method_class(name: str) -> type[FewShotSegmenter]:
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


def build_method(name: str, backbone: str | None = None, backbone_weights: str | None = 'imagenet',
                 **options) -> FewShotSegmenter:
    r"""Method `name` on its backbone. `backbone=None` takes the method's default; `backbone_weights=None` builds
    without initialising the backbone (a checkpoint supplies it); `options` are the method's own options."""
    cls = method_class(name)
    opts = build_options(name, options)
    return cls(Backbone(backbone or cls.default_backbone, backbone_weights, cls.backbone_spec), opts)


__all__ = ['BACKBONES', 'METHODS', 'Adaptation', 'Backbone', 'BackboneSpec', 'EpisodeContext', 'EpisodeRecord',
           'FewShotSegmenter', 'Hooks', 'Output', 'Recipe', 'SupportSet', 'build_method', 'build_options',
           'method_class', 'option']

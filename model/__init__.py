r"""Method registry: name -> class. Adding a method = one file in model/ plus one line here."""
from common.errors import UserError
from model.backbone import BACKBONES, Backbone
from model.base import EpisodeContext, FewShotSegmenter, Hooks
from model.hsnet import HSNet
from model.patnet import PATNet

METHODS: dict[str, type[FewShotSegmenter]] = {
    'hsnet': HSNet,
    'patnet': PATNet,
}


def build_method(name: str, backbone: str = 'resnet50', backbone_weights: str | None = 'imagenet') -> FewShotSegmenter:
    r"""`backbone_weights=None` builds without initialising the backbone (a checkpoint supplies it)."""
    if name not in METHODS:
        raise UserError(f'unknown method {name!r}; choose one of {", ".join(METHODS)}')
    return METHODS[name](Backbone(backbone, backbone_weights))


__all__ = ['BACKBONES', 'METHODS', 'Backbone', 'EpisodeContext', 'FewShotSegmenter', 'Hooks', 'build_method']

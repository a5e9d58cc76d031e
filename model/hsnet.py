r"""HSNet: Hypercorrelation Squeeze Networks for few-shot segmentation (Min, Kang & Cho, ICCV 2021)."""
import torch

from model.backbone import Backbone
from model.base import EpisodeContext, FewShotSegmenter
from model.layers import HPNLearner, mask_features, multilayer_correlation


class HSNet(FewShotSegmenter):
    r"""Masked support taps -> multi-layer cosine correlation -> 4D squeeze/mix learner -> 2-class decoder.

    Trainable: the learner only (2.57 M parameters with ResNet-50). No prototypes; a plug-in acts on the query and
    support features through the base class hooks.
    """

    def __init__(self, backbone: Backbone):
        super().__init__(backbone)
        self.learner = HPNLearner(backbone.stage_sizes)

    def match(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
              ctx: EpisodeContext) -> torch.Tensor:
        support_feats = mask_features(support_feats, ctx.support_masks)
        corrs = multilayer_correlation(query_feats, support_feats, self.backbone.stage_ids)
        return self.learner(corrs)

r"""HSNet: Hypercorrelation Squeeze Networks for few-shot segmentation (Min, Kang & Cho, ICCV 2021)."""
from model.backbone import Backbone
from model.base import EpisodeRecord, FewShotSegmenter, Output
from model.layers import HPNLearner, multilayer_correlation


class HSNet(FewShotSegmenter):
    r"""Masked support taps -> multi-layer cosine correlation -> 4D squeeze/mix learner -> 2-class decoder.

    Trainable: the learner only (2.57 M parameters with ResNet-50). K-shot: per-shot predictions and HSNet's vote.
    No prototypes; a plug-in acts on the query and support features through the base class hooks.
    """

    kshot = 'vote'
    plugin_point = 'features'
    #: Correlate every support pixel, as the reference code does (`multilayer_correlation(dense=True)`), instead of
    #: skipping the masked-out ones on CPU. Same logits; scripts/bench.py --compare-reference sets it to time the
    #: reference's K-shot formulation.
    dense_correlation: bool = False

    def __init__(self, backbone: Backbone, options=None):
        super().__init__(backbone, options)
        self.learner = HPNLearner(backbone.stage_sizes)

    def match(self, record: EpisodeRecord) -> Output:
        corrs = multilayer_correlation(record.query_feats, record.support_feats, self.backbone.stage_ids,
                                       support_masks=record.ctx.support_masks,      # the masked support taps
                                       dense=self.dense_correlation)
        return Output(self.per_shot(self.learner(corrs), record))

r"""PATNet: Pyramid-Anchor Transformation on HSNet for cross-domain few-shot segmentation (Lei et al., ECCV 2022)."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.backbone import Backbone
from model.base import Adaptation, EpisodeContext, EpisodeRecord, FewShotSegmenter, Output, option
from model.layers import (HPNLearner, anchor_factor, at_least_fp32, dense_transform_matrix, masked_average_pooling,
                          multilayer_correlation, normalize_rows, rank2_coefficients, resize_mask, resized_masks)

TRANSFORMS = ('rank2', 'pinv')
# The reference pools prototypes as Σ F·m / (Σ m + 1e-6) (sum-based since its 2023 commit).
PROTOTYPE_EPS = 1e-6


@dataclass
class PATNetOptions:
    transform: str = option('rank2', choices=TRANSFORMS,
                            help="PATNet's anchor transform: rank2 = exact closed form (fast), pinv = the reference's "
                                 "SVD pseudo-inverse and dense CxC channel mix (parity checks)")


class PATNet(FewShotSegmenter):
    r"""HSNet with a Pyramid-Anchor Transformation Module (PATM) in front of the hypercorrelation.

    Per backbone tap l: FP = MAP(F_s, m), BP = MAP(F_s, 1-m) on the unmasked support map (then the plug-in hook may
    fuse them), Ĉ = row-normalised [BP; FP] (2 x C_l), R̂ = the row-normalised 2 x C_l anchors of the tap's stage,
    P = pinv(Ĉ) R̂, and both the query map and the masked support map are mixed as Pᵀ f. The query is transformed
    with each shot's P (query side [B*K]; the backbone still encodes it once). Then multilayer cosine correlation and
    the HPN learner exactly as HSNet; K-shot by HSNet's vote.

    Options:
        transform: 'rank2' (default) computes the same maps in closed form: Pᵀ f = R̂ᵀ (G⁺ Ĉ f) with the 2x2 Gram
            G = Ĉ Ĉᵀ pseudo-inverted in float64, and the correlation runs on the 2-channel maps Lᵀ G⁺ Ĉ f with
            L Lᵀ = R̂ R̂ᵀ (cosines are unchanged, see `model.layers.anchor`). 'pinv' is the reference formulation
            (SVD pseudo-inverse, dense C x C channel mix) for parity checks and benchmarks.
    Test-time adaptation: TFI, fine-tuning of the anchors per episode (`adaptation_loss`; off by default,
    `test.py --finetune-steps 50 --finetune-lr 1e-3`).

    Trainable: the learner and the three 2 x C anchors (2.581 M parameters with ResNet-50).
    """

    kshot = 'vote'
    Options = PATNetOptions
    plugin_point = 'prototypes'       # the CD-TG plug-in fuses text-guided FP/BP before the transform
    adaptation_defaults = Adaptation(steps=0, lr=1e-3)

    def __init__(self, backbone: Backbone, options: PATNetOptions | None = None):
        super().__init__(backbone, options)
        self.transform = self.options.transform
        self.learner = HPNLearner(backbone.stage_sizes)
        # One anchor matrix per backbone stage, shallowest first (ResNet-50: 2x512, 2x1024, 2x2048). The reference
        # builds them as nn.Linear(C, 2) and uses only the weight; its bias never enters the graph, so it is omitted.
        self.stages = sorted(set(backbone.stage_ids))
        width = dict(zip(backbone.stage_ids, backbone.channels))
        self.anchors = nn.ParameterList()
        for stage in self.stages:
            weight = torch.empty(2, width[stage])
            nn.init.kaiming_normal_(weight, a=0, mode='fan_in', nonlinearity='linear')
            self.anchors.append(nn.Parameter(weight))
        # Which anchor serves each tap. (The reference's VGG branch assigns taps 0-3 / 4-9 / 10-12 as for ResNet-50,
        # which leaves its third VGG anchor unused; here every stage has its own anchor for every backbone.)
        self.tap_anchor = [self.stages.index(s) for s in backbone.stage_ids]
        # Taps per stage; the taps of one stage share width and size, so their rank-2 coefficients are solved together.
        self.stage_taps = [[i for i, a in enumerate(self.tap_anchor) if a == si] for si in range(len(self.stages))]

    # --- forward ------------------------------------------------------------------------------------------------
    def match(self, record: EpisodeRecord) -> Output:
        fg, bg = self.prototypes(record.support_feats, record.ctx)
        return Output(self.per_shot(self.match_prototypes(record.query_feats, record.support_feats, fg, bg,
                                                          record.ctx), record))

    def prototypes(self, support_feats: list[torch.Tensor],
                   ctx: EpisodeContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        r"""Per tap FP = MAP(F_s, m), BP = MAP(F_s, 1-m) [B*K,C_l] on the unmasked support taps, passed through
        the plug-in's `prototypes` hook (as sets of one prototype, [B*K,1,C_l]; CD-TG fuses its text-guided
        prototypes there)."""
        masks = self._support_masks(support_feats, ctx)
        pairs = {size: torch.cat([m, 1 - m], dim=1) for size, m in masks.items()}          # [B*K,2,h,w]
        fg, bg = [], []
        for feat in support_feats:
            # FP and BP in one pass over the tap: [B*K,2,hw] x [B*K,hw,C] -> [B*K,2,C]
            pooled = masked_average_pooling(feat, pairs[tuple(feat.shape[-2:])], eps=PROTOTYPE_EPS)
            fg.append(pooled[:, :1])
            bg.append(pooled[:, 1:])
        fg, bg = self.hooks.prototypes(fg, bg, support_feats, ctx)
        return [f[:, 0] for f in fg], [b[:, 0] for b in bg]

    def match_prototypes(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                         fg: list[torch.Tensor], bg: list[torch.Tensor], ctx: EpisodeContext) -> torch.Tensor:
        r"""PATM with the given prototypes, then correlation and learner -> per-shot logits [B*K,2,h,w]."""
        query_maps, support_maps = self.transform_maps(query_feats, support_feats, fg, bg, ctx)
        corrs = multilayer_correlation(query_maps, support_maps, self.backbone.stage_ids)
        return self.learner(corrs)

    def transform_maps(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                       fg: list[torch.Tensor], bg: list[torch.Tensor],
                       ctx: EpisodeContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        r"""PATM on the query taps [B] (per shot -> [B*K]) and the masked support taps [B*K].

        'pinv' returns the reference's C_l-channel maps Pᵀ f; 'rank2' returns 2-channel maps Lᵀ G⁺ Ĉ f, which are
        not the same tensors but have exactly the same cosine correlations (all the model uses them for).
        """
        if self.transform == 'rank2':
            return self._rank2_maps(query_feats, support_feats, fg, bg, ctx)
        return self._dense_maps(query_feats, support_feats, fg, bg, ctx)

    def _support_masks(self, feats: list[torch.Tensor], ctx: EpisodeContext) -> dict:
        r"""The support masks resized once per distinct tap size: {(h, w): [B*K,1,h,w]}."""
        return resized_masks(ctx.support_masks, feats)

    def _rank2_maps(self, query_feats, support_feats, fg, bg, ctx):
        r"""2-channel maps z = Lᵀ G⁺ Ĉ f whose cosine correlations equal those of the reference's Pᵀ f.

        Computed in at least float32 also under autocast: the projection to 2 channels is cheap, and in bf16 the
        2-channel cosines the learner sees would keep only ~2 significant digits."""
        with torch.autocast(query_feats[0].device.type, enabled=False):
            return self._rank2_maps_fp32([at_least_fp32(f) for f in query_feats],
                                         [at_least_fp32(f) for f in support_feats],
                                         [at_least_fp32(f) for f in fg], [at_least_fp32(b) for b in bg], ctx)

    def _rank2_maps_fp32(self, query_feats, support_feats, fg, bg, ctx):
        nq, k = query_feats[0].shape[0], ctx.nshot
        masks = self._support_masks(support_feats, ctx)
        query_maps, support_maps = [None] * len(query_feats), [None] * len(query_feats)
        for si, taps in enumerate(self.stage_taps):
            nl = len(taps)
            stack = torch.stack([torch.stack([bg[i], fg[i]], dim=1) for i in taps], dim=1)   # [B*K,L,2,C]
            factor = anchor_factor(self.anchors[si])                                       # L [2,2] float64
            proj = (factor.transpose(0, 1) @ rank2_coefficients(stack)).to(query_feats[taps[0]].dtype)
            c = proj.shape[-1]                                                              # Lᵀ G⁺ Ĉ [B*K,L,2,C]
            # Query n is mixed by each of its K shots: rows [Nq,L,K*2,C]
            proj_q = proj.view(nq, k, nl, 2, c).transpose(1, 2).reshape(nq, nl, k * 2, c)
            for j, i in enumerate(taps):
                # One matmul per tap, reading the (channels-last) backbone map in place: no stacked copy.
                q, s = query_feats[i], support_feats[i]
                hq, wq = q.shape[-2:]
                hs, ws = s.shape[-2:]
                zq = proj_q[:, j] @ q.flatten(2)                                            # [Nq,K*2,hq*wq]
                query_maps[i] = zq.view(nq * k, 2, hq, wq)
                # The transform is per-pixel linear, so masking the 2-channel result equals masking f first.
                support_maps[i] = (proj[:, j] @ s.flatten(2)).view(-1, 2, hs, ws) * masks[(hs, ws)]
        return query_maps, support_maps

    def _dense_maps(self, query_feats, support_feats, fg, bg, ctx):
        r"""The reference: P = pinv(Ĉ) R̂ (C x C), query and masked support mixed as Pᵀ f."""
        nq, k = query_feats[0].shape[0], ctx.nshot
        masks = self._support_masks(support_feats, ctx)
        query_maps, support_maps = [], []
        for i, (q, s) in enumerate(zip(query_feats, support_feats)):
            stack = torch.stack([bg[i], fg[i]], dim=1)                                # [B*K,2,C]
            pt = dense_transform_matrix(stack, self.anchors[self.tap_anchor[i]]).transpose(1, 2)   # Pᵀ [B*K,C,C]
            c, hq, wq = q.shape[1:]
            # [Nq,K,C,C] x [Nq,1,C,hq*wq] -> [Nq,K,C,hq*wq] -> [Nq*K,C,hq,wq]
            zq = torch.matmul(pt.view(nq, k, c, c), q.flatten(2).unsqueeze(1))
            query_maps.append(zq.view(nq * k, c, hq, wq))
            masked = s * masks[tuple(s.shape[-2:])]
            support_maps.append(torch.bmm(pt, masked.flatten(2)).view_as(s))
        return query_maps, support_maps

    def transform_vectors(self, x: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, tap: int) -> torch.Tensor:
        r"""PATM applied to vectors: Pᵀ x for x [N,C_l] with the P built from fg/bg [N,C_l] for tap `tap`, as
        C_l-channel vectors (both transforms; differentiable in the anchors)."""
        stack = torch.stack([bg, fg], dim=1)                                          # [N,2,C]
        anchor = self.anchors[self.tap_anchor[tap]]
        if self.transform == 'rank2':
            coef = rank2_coefficients(stack) @ x.to(torch.float64).unsqueeze(-1)       # G⁺ Ĉ x [N,2,1]
            return (coef.transpose(1, 2) @ normalize_rows(anchor.to(torch.float64))).squeeze(1).to(x.dtype)
        return (x.unsqueeze(1) @ dense_transform_matrix(stack, anchor)).squeeze(1)     # (xᵀ P)ᵀ = Pᵀ x

    # --- test-time fine-tuning (TFI) ------------------------------------------------------------------------------
    def tfi_loss(self, query_feats: list[torch.Tensor], fg: list[torch.Tensor], bg: list[torch.Tensor],
                 query_pred: torch.Tensor, nshot: int) -> torch.Tensor:
        r"""PATNet's task-adaptive fine-tuning loss on the shallowest stage's taps (layer2 for ResNets).

        For each shot k and tap l of that stage:
            q = PATM_k(MAP(F_q, ŷ)),  s = PATM_k(FP_k),
            loss += KL(softmax(s) ‖ softmax(q)) = Σ_c softmax(s)_c (log softmax(s)_c - log softmax(q)_c),
        summed over taps and averaged over shots. ŷ is the model's own (voted, binary) query prediction
        query_pred [Nq,H,W], resized bilinearly like the support masks; FP_k the support prototype the model uses
        (after the plug-in hook). PATM_k(x) = Pᵀ_k x is linear per pixel, so MAP(PATM(F), m) = PATM(MAP(F, m)): the
        transform is applied to the pooled vectors, which equals transforming the maps before pooling (the paper's
        order, and the one that gives the loss a path to the anchors) at a fraction of the cost.
        """
        total = 0
        for tap, stage in enumerate(self.tap_anchor):
            if stage != 0:
                continue
            feat = query_feats[tap]
            mask = resize_mask(query_pred, tuple(feat.shape[-2:]), feat.dtype)
            pooled = masked_average_pooling(feat, mask, eps=PROTOTYPE_EPS)              # [Nq,C]
            pooled = pooled.repeat_interleave(nshot, dim=0)                             # [Nq*K,C]: n*K+k
            q = self.transform_vectors(pooled, fg[tap], bg[tap], tap)
            s = self.transform_vectors(fg[tap], fg[tap], bg[tap], tap)
            # F.kl_div(log q, p) = Σ p (log p - log q), as the reference's `finetune_reference` (reduction 'sum').
            total = total + F.kl_div(q.log_softmax(dim=-1), s.softmax(dim=-1), reduction='sum')
        return total / nshot

    def adaptation_parameters(self, record: EpisodeRecord) -> list[torch.Tensor]:
        r"""TFI adapts the anchors (only the shallowest stage's receives a gradient from the layer2 loss)."""
        return list(self.anchors)

    def adaptation_loss(self, record: EpisodeRecord, step: int) -> torch.Tensor:
        r"""One TFI step: predict with the current anchors (no gradient), then `tfi_loss` of that prediction. The
        prototypes do not depend on the anchors."""
        with torch.no_grad():
            fg, bg = self.prototypes(record.support_feats, record.ctx)
            pred = self.segment(self.match(record))                                   # [1,H,W] current prediction
        return self.tfi_loss(record.query_feats, fg, bg, pred, record.nshot)

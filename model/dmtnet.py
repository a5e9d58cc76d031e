r"""DMTNet: Doubly Matching Transformation for cross-domain few-shot segmentation (Chen et al., IJCAI 2024).

PATNet (model/patnet.py) plus a query-side transform built from the query's own prototypes, a background branch
and test-time self-finetuning (TSF). Facts about the public code (ChenJiayi68/DMTNet @ 2358ce9, `model/dmtnet.py`)
are cited as `D:line`.
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.constants import IGNORE_INDEX
from model.backbone import Backbone
from model.base import Adaptation, EpisodeContext, EpisodeRecord, Output, option
from model.layers import (cholesky_psd, dense_transform_matrix, masked_average_pooling, multilayer_correlation,
                          normalize_rows, rank2_coefficients)
from model.patnet import PROTOTYPE_EPS, PATNet


class Prototypes(NamedTuple):
    r"""The four prototype sets of the double transformation, one list entry per tap: the supports' foreground and
    background (fg, bg) and the query's pseudo foreground and background (fg_q, bg_q)."""
    fg: list
    bg: list
    fg_q: list
    bg_q: list

TRANSFORMS = ('rank4', 'pinv')
GRID_SCALE = 10.0          # self-matching logits are 10 · cosine (D:333)
BETA = 0.5                 # query transform = β·P_q + (1 - β)·P (D:212-213)
ANCHOR_DROPOUT = 0.2       # on the anchor rows, training only (D:81, D:197-198)
GRID_LOSS_WEIGHT = 0.5     # L = CE(fg) + 0.5·L_grid + CE(bg) (trainDDP.py:40)


@dataclass
class DMTNetOptions:
    transform: str = option('rank4', choices=TRANSFORMS,
                            help="DMTNet's transforms: rank4 = exact closed form (4-channel maps, fast), pinv = the "
                                 "reference's SVD pseudo-inverses and dense CxC channel mixes (parity checks)")
    grid: int = option(4, low=1, high=64,
                       help="grid_num of the support grid prototypes: cell side = tap side // grid, placed as the "
                            "reference's get_grid (at 400x400 this gives 5x5 overlapping cells per tap)")


@lru_cache(maxsize=64)
def grid_cells(height: int, width: int, grid: int, device: torch.device) -> torch.Tensor:
    r"""The reference's grid cells (`get_grid(shape, grid_num)`, non-overlapping mode, D:103-127) as a binary
    matrix [N_cells, height*width], row-major (h outer, w inner).

    Cell side j = side // grid (at least 1; the reference fails with a zero step on maps smaller than `grid`), starts
    0, j, 2j, ... while the cell fits, plus one last start side - j when the previous cell stops short of the border,
    so e.g. side 50 -> starts 0, 12, 24, 36, 38: five cells per side, the last two overlapping. Cached per shape.
    """
    def starts(side: int) -> list[int]:
        cell = max(side // grid, 1)
        out = list(range(0, side - cell + 1, cell))
        if out[-1] + cell < side:
            out.append(side - cell)
        return [(s, s + cell) for s in out]

    cells = []
    for h0, h1 in starts(height):
        for w0, w1 in starts(width):
            cell = torch.zeros(height, width)
            cell[h0:h1, w0:w1] = 1
            cells.append(cell.flatten())
    return torch.stack(cells).to(device)


class DMTNet(PATNet):
    r"""PATNet with a doubly matching transformation, a background branch and test-time self-finetuning.

    Per support (B*K rows; the query is encoded once and matched per shot) and backbone tap l (13 for ResNet-50):
      1. FP = MAP(F_s, m), BP = MAP(F_s, 1-m) on the unmasked support tap, then the plug-in hook (PATNet.prototypes).
      2. Grid prototypes FP_c, BP_c: the same pooling inside each cell of `grid_cells` (raw support tap, not hooked).
      3. Query self-matching: out_l = (1/N) Σ_c 10·[cos(F_q, BP_c), cos(F_q, FP_c)]; pseudo-mask ŷ = argmax (ties to
         background); FP_q = MAP(F_q, ŷ), BP_q = MAP(F_q, 1-ŷ) (eps 1e-6, no resize).
      4. Transforms: P = pinv(Ĉ) R̂ from Ĉ = normalised [BP; FP] and the support anchors R (PATNet's), and
         P_q = pinv(Ĉ_q) R̂_q from Ĉ_q = normalised [FP_q; BP_q] and separate query anchors R_q. The query stack's order
         is the reference's (its positional arguments swap FP_q and BP_q, D:91 vs D:179); with i.i.d. anchors this is
         only a relabelling of R_q's rows, kept for checkpoint parity. The query map becomes (β P_q + (1-β) P)ᵀ F_q,
         the fg- and bg-masked support maps Pᵀ(F_s·m) and Pᵀ(F_s·(1-m)).
      5. Two cosine hypercorrelations (query with each masked support) through the same HPN learner: foreground
         logits (the prediction; K-shot by HSNet's vote) and background-branch logits ("is background").
    Anchors (2 x C per stage, kaiming fan-in) get dropout 0.2 per row, tap and episode before their normalisation,
    in training only: the reference never calls eval() in its TSF test script, so there its test predictions also
    ran with dropout; here evaluation is deterministic.

    Options:
        transform: 'rank4' (default) computes the same correlations in closed form. With A = G⁺Ĉ, G = ĈĈᵀ (2x2, float64,
            `rank2_coefficients`), the query map is Wᵀu with W = [R̂; R̂_q] (4 x C) and u = [(1-β) A f; β A_q f], and the
            support map Wᵀv with v = [A f; 0]; with L Lᵀ = W Wᵀ (4x4, `cholesky_psd`) all inner products, hence all
            cosines, equal those of the 4-channel maps Lᵀu and Lᵀv. 'pinv' is the reference formulation (SVD
            pseudo-inverses, dense C x C mixes) for parity checks.
        grid: grid_num of step 2 (4, as the reference).
    Loss (named terms): 'fg' = CE(fg logits, M_q), 'bg' = CE(bg logits, 1 - M_q) (255 stays ignored in both), and
    'grid_nograd' = 0.5 · mean_l CE(out_l, M_q at tap size). The grid maps are built from frozen backbone features
    and parameter-free prototypes, so this term has no gradient (also in the reference, where it sits behind
    no_grad features, D:84-90): it is detached and only changes the logged total, as there.
    Test-time adaptation (TSF, off by default): per episode, Adam on the affine weights γ of the last GroupNorm of
    both mixing blocks (2 x 128) so that each support, used as its own query, predicts its mask; then the query is
    predicted and the weights restored (the reference keeps one Adam state and the drifted γ over the whole test set,
    and pools 30 episodes per step). `test.py --finetune-steps 1 --finetune-lr 1e-6` is the reference's step and lr
    for Deepglobe, ISIC and FSS-1000 (1e-1 for Chest X-ray).

    Trainable: the learner and the six 2 x C anchors (2,588,130 parameters with ResNet-50, as the reference).
    PATNet's `transform_maps` / `tfi_loss` (its single transform and TFI) are inherited but not used by DMTNet.
    """

    Options = DMTNetOptions
    adaptation_defaults = Adaptation(steps=0, lr=1e-6)
    train_recipe = {'epochs': 20, 'bsz': 24}             # the public code's train.py

    def __init__(self, backbone: Backbone, options: DMTNetOptions | None = None):
        super().__init__(backbone, options)
        # Query anchors (the reference's reference_layer4-6), one per stage like the support anchors (layer1-3).
        self.query_anchors = nn.ParameterList()
        for anchor in self.anchors:
            weight = torch.empty_like(anchor)
            nn.init.kaiming_normal_(weight, a=0, mode='fan_in', nonlinearity='linear')
            self.query_anchors.append(nn.Parameter(weight))

    # --- forward ------------------------------------------------------------------------------------------------
    def match(self, record: EpisodeRecord) -> Output:
        fg, bg = self.prototypes(record.support_feats, record.ctx)
        logits, grid = self.doubly_matching(record.query_feats, record.support_feats, fg, bg, record.ctx)
        return Output(self.per_shot(logits[:, 0], record),
                      {'bg_logits': self.per_shot(logits[:, 1], record), 'grid': grid})

    def match_prototypes(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                         fg: list[torch.Tensor], bg: list[torch.Tensor], ctx: EpisodeContext) -> torch.Tensor:
        r"""Foreground-branch logits [B*K,2,h,w] with the given (hooked) support prototypes (PATNet's signature)."""
        return self.doubly_matching(query_feats, support_feats, fg, bg, ctx, background=False)[0][:, 0]

    def doubly_matching(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                        fg: list[torch.Tensor], bg: list[torch.Tensor], ctx: EpisodeContext,
                        background: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        r"""Steps 2-5 of the class docstring.

        Args:
            query_feats: per tap [Nq,C,h,w]; support_feats: per tap [Nq*K,C,h,w]; fg, bg: per tap [Nq*K,C].
            background: also run the background branch.
        Returns:
            logits [Nq*K, 1 or 2 (fg, bg branch), 2, h', w'] at the learner's resolution, and the self-matching maps
            out_l [Nq*K,2,h_l,w_l] per tap (no gradient).
        """
        masks = self._support_masks(support_feats, ctx)
        fg_q, bg_q, grid = self.query_prototypes(query_feats, support_feats, masks, ctx.nshot)
        protos = Prototypes(fg, bg, fg_q, bg_q)
        query_maps, support_maps = self.transform_maps_doubly(query_feats, support_feats, masks, protos, ctx.nshot,
                                                              background)
        branches = 2 if background else 1
        # The branches' support maps are interleaved [(n, fg), (n, bg), ...], so the query maps serve both unrepeated
        # and one learner pass computes both (the learner treats every item separately).
        corrs = multilayer_correlation(query_maps, support_maps, self.backbone.stage_ids)
        logits = self.learner(corrs)
        return logits.view(-1, branches, *logits.shape[1:]), grid

    # --- grid prototypes and query self-matching ------------------------------------------------------------
    def query_prototypes(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor], masks: dict,
                         nshot: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        r"""Steps 2-3: per tap FP_q, BP_q [Nq*K,C] from the query's pseudo-mask under each shot's grid prototypes,
        and the self-matching maps out_l [Nq*K,2,h,w].

        Since cos(x, p) = x̂·p̂, the mean over cells is x̂·mean_c p̂_c: each support contributes one mean direction per
        class, and out_l = 10·[x̂·b̄, x̂·f̄] costs one small matmul per tap (a zero prototype, e.g. a cell without
        foreground, has cosine 0 as with F.cosine_similarity; the two differ only if |x|·|p| < 1e-8 without being 0).
        N is the tap's own cell count (the reference divides every tap by tap 0's count; they agree whenever all taps
        have the same count, e.g. 25 at 400x400; the pseudo-mask never depends on it). The maps carry no gradient to
        any parameter (frozen features, hard pseudo-mask).
        """
        nq, k = query_feats[0].shape[0], nshot
        fg_q, bg_q, grid = [], [], []
        for q, s in zip(query_feats, support_feats):
            h, w = s.shape[-2:]
            cells = grid_cells(h, w, self.options.grid, s.device).to(s.dtype)           # [N,hw]
            m = masks[(h, w)].flatten(2)                                                 # [Nq*K,1,hw]
            cell_masks = torch.cat([cells * m, cells * (1 - m)], dim=1).view(-1, 2 * len(cells), h, w)
            pooled = masked_average_pooling(s, cell_masks, eps=PROTOTYPE_EPS)            # [Nq*K,2N,C]: FP_c, BP_c
            directions = _unit(pooled).view(-1, 2, len(cells), s.shape[1]).mean(dim=2)  # [Nq*K,2,C]: f̄, b̄
            hq, wq = q.shape[-2:]
            unit_q = _unit(q.flatten(2).transpose(1, 2)).transpose(1, 2)                 # [Nq,C,hq*wq]
            # channels [bg, fg] as the reference: rows (b̄, f̄) of every shot of query n
            out = GRID_SCALE * (directions.flip(1).reshape(nq, k * 2, -1) @ unit_q)      # [Nq,K*2,hq*wq]
            out = out.view(nq * k, 2, hq, wq)
            grid.append(out)
            pseudo = (out[:, 1] > out[:, 0]).to(q.dtype).unsqueeze(1)                    # argmax, ties to background
            pairs = torch.cat([pseudo, 1 - pseudo], dim=1).view(nq, k * 2, hq, wq)
            pooled_q = masked_average_pooling(q, pairs, eps=PROTOTYPE_EPS).view(nq * k, 2, -1)
            fg_q.append(pooled_q[:, 0])
            bg_q.append(pooled_q[:, 1])
        return fg_q, bg_q, grid

    # --- the doubly matching transformation --------------------------------------------------------------------
    def anchor_rows(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        r"""Per stage, the support and query anchors (R, R_q): [2,C] in eval mode; in training [n,L,2,C] with a fresh
        dropout mask per support row, tap and anchor entry (the reference redraws it for every tap and episode; its
        1/(1-p) rescaling cancels in the row normalisation). Both transforms take their anchors from here, so they
        see the same draw for the same RNG state."""
        rows = []
        for si, taps in enumerate(self.stage_taps):
            pair = []
            for anchor in (self.anchors[si], self.query_anchors[si]):
                if self.training:
                    anchor = F.dropout(anchor.expand(n, len(taps), *anchor.shape), ANCHOR_DROPOUT, training=True)
                pair.append(anchor)
            rows.append((pair[0], pair[1]))
        return rows

    def transform_maps_doubly(self, query_feats, support_feats, masks, protos: 'Prototypes', nshot: int,
                              background: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        r"""Step 4: the transformed query maps [Nq*K,...] and masked support maps [Nq*K*branches,...] (fg and bg
        interleaved). 'rank4' returns 4-channel maps with the reference's correlations, 'pinv' the reference's
        C-channel maps."""
        anchors = self.anchor_rows(support_feats[0].shape[0])
        if self.options.transform == 'rank4':
            return self._rank4_maps(query_feats, support_feats, masks, protos, nshot, background, anchors)
        return self._dense_maps_doubly(query_feats, support_feats, masks, protos, nshot, background, anchors)

    def _rank4_maps(self, query_feats, support_feats, masks, protos: 'Prototypes', nshot, background, anchors):
        r"""4-channel maps z = Lᵀu (query) and Lᵀv (supports) whose cosine correlations equal the reference's."""
        fg, bg, fg_q, bg_q = protos
        nq, k = query_feats[0].shape[0], nshot
        query_maps, support_maps = [None] * len(query_feats), [None] * len(query_feats)
        for si, taps in enumerate(self.stage_taps):
            nl = len(taps)
            coef = rank2_coefficients(torch.stack([torch.stack([bg[i], fg[i]], 1) for i in taps], 1))      # A
            coef_q = rank2_coefficients(torch.stack([torch.stack([fg_q[i], bg_q[i]], 1) for i in taps], 1))  # A_q
            rows, rows_q = (normalize_rows(a.to(torch.float64)) for a in anchors[si])
            w = torch.cat([rows, rows_q], dim=-2)                                        # W = [R̂; R̂_q]
            lt = cholesky_psd(w @ w.transpose(-1, -2)).transpose(-1, -2)                 # Lᵀ [(Nq*K,L,)4,4]
            dtype = query_feats[taps[0]].dtype
            proj_q = (lt @ torch.cat([(1 - BETA) * coef, BETA * coef_q], dim=-2)).to(dtype)   # Lᵀ[(1-β)A; βA_q]
            proj_s = (lt[..., :2] @ coef).to(dtype)                                      # Lᵀ[A; 0]  [Nq*K,L,4,C]
            c = proj_q.shape[-1]
            proj_q = proj_q.view(nq, k, nl, 4, c).transpose(1, 2).reshape(nq, nl, k * 4, c)
            for j, i in enumerate(taps):
                q, s = query_feats[i], support_feats[i]
                hq, wq = q.shape[-2:]
                hs, ws = s.shape[-2:]
                query_maps[i] = (proj_q[:, j] @ q.flatten(2)).view(nq * k, 4, hq, wq)
                # per-pixel linear, so masking the 4-channel result equals transforming the masked map
                z = (proj_s[:, j] @ s.flatten(2)).view(-1, 4, hs, ws)
                support_maps[i] = _branch_maps(z, masks[(hs, ws)], background)
        return query_maps, support_maps

    def _dense_maps_doubly(self, query_feats, support_feats, masks, protos: 'Prototypes', nshot, background,
                           anchors):
        r"""The reference (D:179-228): P = pinv(Ĉ) R̂, P_q = pinv(Ĉ_q) R̂_q (C x C), maps mixed by Pᵀ and
        (β P_q + (1-β) P)ᵀ."""
        fg, bg, fg_q, bg_q = protos
        nq, k = query_feats[0].shape[0], nshot
        query_maps, support_maps = [None] * len(query_feats), [None] * len(query_feats)
        for si, taps in enumerate(self.stage_taps):
            rows, rows_q = anchors[si]
            for j, i in enumerate(taps):
                r = rows if rows.dim() == 2 else rows[:, j]
                r_q = rows_q if rows_q.dim() == 2 else rows_q[:, j]
                p = dense_transform_matrix(torch.stack([bg[i], fg[i]], 1), r)                 # [Nq*K,C,C]
                p_q = dense_transform_matrix(torch.stack([fg_q[i], bg_q[i]], 1), r_q)
                t_q = (BETA * p_q + (1 - BETA) * p).transpose(1, 2)
                q, s = query_feats[i], support_feats[i]
                c, hq, wq = q.shape[1:]
                zq = torch.matmul(t_q.view(nq, k, c, c), q.flatten(2).unsqueeze(1))        # [Nq,K,C,hq*wq]
                query_maps[i] = zq.view(nq * k, c, hq, wq)
                m = masks[tuple(s.shape[-2:])]
                parts = [s * m, s * (1 - m)] if background else [s * m]
                pt = p.transpose(1, 2)
                maps = [torch.bmm(pt, part.flatten(2)).view_as(s) for part in parts]
                support_maps[i] = torch.stack(maps, dim=1).flatten(0, 1)
        return query_maps, support_maps

    # --- training -----------------------------------------------------------------------------------------------
    def loss(self, output: Output, batch: dict) -> dict[str, torch.Tensor]:
        r"""'fg': CE of the foreground branch; 'bg': CE of the background branch against the inverted query mask
        (255 kept as 255); 'grid_nograd': 0.5 x the self-matching CE, which has no gradient (see the class
        docstring). Outputs of the adaptation harness carry no aux: then only 'fg'."""
        target = batch['query_mask'].long()
        terms = {'fg': self.cross_entropy(output.logits, target)}
        if 'bg_logits' in output.aux:
            terms['bg'] = self.cross_entropy(output.aux['bg_logits'], inverted_mask(target))
        if 'grid' in output.aux:
            terms['grid_nograd'] = GRID_LOSS_WEIGHT * grid_loss(output.aux['grid'], target).detach()
        return terms

    # --- test-time self-finetuning (TSF) --------------------------------------------------------------------------
    def adaptation_parameters(self, record: EpisodeRecord) -> list[torch.Tensor]:
        r"""The reference's TSF parameters (test_finetuning.py:19): γ of the third GroupNorm of both mixing blocks
        (`hpn_learner.encoder_layer4to3.7.weight`, `encoder_layer3to2.7.weight`), 2 x 128 values."""
        return [self.learner.mix43[7].weight, self.learner.mix32[7].weight]

    def adaptation_loss(self, record: EpisodeRecord, step: int) -> torch.Tensor:
        r"""Each of the episode's K supports is its own query (`predict_mask_nshot_support`, D:269-291): mean over
        shots of the foreground-branch CE against its mask. Only the supports and their labels are used."""
        k = record.nshot
        ctx = EpisodeContext(record.ctx.class_id.repeat_interleave(k), 1, record.ctx.support_masks)
        feats = record.support_feats
        with torch.no_grad():                                   # the prototypes do not depend on γ
            fg, bg = self.prototypes(feats, ctx)
        logits = self.upsample(self.match_prototypes(feats, feats, fg, bg, ctx), record)     # [K,2,H,W]
        return F.cross_entropy(logits, ctx.support_masks.long(), ignore_index=IGNORE_INDEX)


def _unit(x: torch.Tensor) -> torch.Tensor:
    r"""x / ||x|| along the last dim, 0 for a zero vector (the value F.cosine_similarity gives it)."""
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _branch_maps(z: torch.Tensor, mask: torch.Tensor, background: bool) -> torch.Tensor:
    r"""Transformed support maps z [N,c,h,w] masked by m (and 1 - m): [N*branches,c,h,w], branches interleaved."""
    if not background:
        return z * mask
    return torch.stack([z * mask, z * (1 - mask)], dim=1).flatten(0, 1)


def inverted_mask(target: torch.Tensor) -> torch.Tensor:
    r"""The background branch's target: 1 - M, with ignored pixels (255) kept ignored."""
    return torch.where(target == IGNORE_INDEX, target, 1 - target)


def grid_loss(maps: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    r"""Mean over taps of CE(out_l, M_q at the tap's size) (`pred_mask_loss`, D:359-367).

    The target is resized as the reference does: bilinear (aligned corners), then truncated (`.long()`), so only
    pixels that interpolate to exactly 1 stay foreground. Pixels whose neighbourhood holds an ignored label are
    ignored (the reference's loader had none). maps: per tap [B*K,2,h,w]; target [B,H,W] with 255 = ignore.
    """
    rows = maps[0].shape[0] // target.shape[0]
    fg = (target == 1).float().repeat_interleave(rows, dim=0).unsqueeze(1)
    ignored = (target == IGNORE_INDEX).float().repeat_interleave(rows, dim=0).unsqueeze(1)
    total = 0
    for out in maps:
        size = tuple(out.shape[-2:])
        small = F.interpolate(fg, size, mode='bilinear', align_corners=True)[:, 0].long()
        skip = F.interpolate(ignored, size, mode='bilinear', align_corners=True)[:, 0] > 0
        small = torch.where(skip, torch.full_like(small, IGNORE_INDEX), small)
        ce = F.cross_entropy(out, small, ignore_index=IGNORE_INDEX, reduction='sum')
        total = total + ce / (small != IGNORE_INDEX).sum().clamp(min=1)
    return total / len(maps)

r"""IFA: iterative support-query correspondence mining with target adaptation ("Adapt Before Comparison", Nie et al.,
CVPR 2024).

Facts about the public code (niejiahao1998/IFA @ 4d5cbe6, `model/IFA_matching.py`, itself SSP's matching network plus
the BFP loop) are cited as `I:line`.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from model.backbone import BackboneSpec
from model.base import Adaptation, EpisodeRecord, FewShotSegmenter, Output, Recipe, option
from model.layers import masked_average_pooling

SCALE = 10.0                         # logits = 10 · cosine (I:186-191)
FG_THRESHOLD, BG_THRESHOLD = 0.7, 0.6  # SSP's confident pixels (I:137-148) ...
TOP_K = 12                           # ... or the 12 most confident ones when none passes
LOCAL_TEMPERATURE = 2.0              # local background prototypes: softmax(2 · cos) (I:164-165)
PROTOTYPE_EPS = 1e-5                 # MAP: Σ F·m / (Σ m + 1e-5) (I:193-197)
NORM_EPS = 1e-12                     # SSP's norms: the reference has none (NaN for an all-zero feature)
COSINE_EPS = 1e-8                    # F.cosine_similarity's
ADAPT_ITERATIONS = 3                 # BFP iterations in training (I:68-84); one at test time
LATER_WEIGHT = 0.1                   # weight of each iteration-2/3 term in the adaptation loss (ifa.py:217-221)
SGD_MOMENTUM, SGD_WEIGHT_DECAY = 0.9, 5e-4
REFERENCE_MILESTONES = (666, 1333)   # the code's lr drops: (24000 // bsz 12) // 3 and 2 * (...) // 3 iterations
SCHEDULES = ('thirds', 'reference')


@dataclass
class IFAOptions:
    milestones: str = option('thirds', choices=SCHEDULES,
                             help="source-training lr drops (÷10 twice): thirds = at 1/3 and 2/3 of the run (the "
                                  "paper), reference = after optimizer steps 666 and 1333 (the public code at its "
                                  "batch 12; with its 20 epochs ~95%% of training then runs at lr/100)")


class IFA(FewShotSegmenter):
    r"""Prototype matching with iterative support-query correspondence mining (SSP + BFP) on a dilated ResNet layer3.

    Backbone: ResNet-50 up to layer3, layer3 dilated (output stride 8; its block 0 undilated, as torchvision and the
    reference), no final ReLU on layer3; layer4 is never built. layer2 and layer3 are fine-tuned (conv weights only:
    every BatchNorm stays frozen, as the stem and layer1). The reference uses a deep-stem (3 x 3 conv 64-64-128)
    ResNet-50 whose ImageNet weights are not in torchvision; here the stem is torchvision's (see docs/methods.md).

    Matching, for B episodes of K shots (F_q [B,C,h,w], F_s [B*K,C,h,w], h = H/8):
      * FP, BP = MAP(F_s, m), MAP(F_s, 1-m) per shot (eps 1e-5), averaged over the K shots, then the plug-in hook
        (CD-TG fuses its text prototypes here, right after the K-shot average);
      * sim(F, fp, bp) = 10·[cos(F, bp), cos(F, fp)] (fp, bp global [.,C,1,1] or per pixel [.,C,h,w]);
      * SSP(F, out): with p = softmax(out), the confident pixels (p_fg > 0.7, else the top 12; p_bg > 0.6, else the
        top 12) give SSFP, SSBP (their mean features) and, per pixel x, the local background prototype
        ASBP(x) = Σ_j softmax_j(2·cos(F_x, F_j)) F_j over the selected background pixels j;
      * one BFP iteration from (FP, BP): FP₁ = 0.5 FP + 0.5 SSFP, BP₁ = 0.3 SSBP + 0.7 ASBP from SSP(F_q, sim(F_q, FP,
        BP)); out₁ = sim(F_q, FP₁, BP₁). First iteration only, refinement: SSP(F_q, out₁) gives FP₂' = 0.5 FP +
        0.5 SSFP₂, BP₂' = 0.3 SSBP₂ + 0.7 ASBP₂, then FP₂ = 0.5 FP + 0.2 FP₁ + 0.3 FP₂', BP₂ = 0.5 BP + 0.2 BP₁ +
        0.3 BP₂', and the prediction is 0.7·sim(F_q, FP₂, BP₂) + 0.3·out₁;
      * in training, the symmetric query -> support pass: SSP(F_s, sim(F_s, FP₁, BP₁)) gives FP_s = 0.5 FP +
        0.5 SSFP_s, BP_s = 0.3 SSBP_s + 0.7 ASBP_s and supp_out₁ = sim(F_s, FP_s, BP_s); (FP_s, BP_s) averaged over
        the K shots seed the next iteration. The per-pixel BP maps are compared position by position across images,
        as the reference does. Supports are laid out batch-major (row b*K+k) everywhere: the reference mixes a
        shot-major and a batch-major layout, which pairs supports with other episodes' prototypes when B, K > 1.
    Test time runs one (refined) iteration; training runs the support pass as well. Source training uses the
    reference's loss of iteration 1 (refined + out₁ + self-prediction + 0.2 supp + 0.4 supp_out₁; the reference also
    computes iterations 2 and 3 there, with no loss term, so they are skipped); the adaptation stage runs all 3
    iterations and adds 0.1 x their query and support terms.
    Target adaptation (off by default; `test.py --finetune-steps 20 --finetune-lr 5e-4`, 5e-6 for Chest X-ray, as
    the reference): per test episode, SGD (momentum 0.9, weight decay 5e-4) on layer2/layer3 with pseudo-episodes
    made only of that episode's K supports (pseudo-query = a support with a deterministic augmentation), then the
    query is predicted and every weight restored. The reference fine-tunes one model on the test pool and selects
    its epoch on test mIoU; nothing here is selected on target labels.

    Trainable: the conv weights of layer2 and layer3 (8,290,304 parameters with ResNet-50, as the reference).
    """

    kshot = 'joint'
    Options = IFAOptions
    backbone_spec = BackboneSpec(taps=('layer3',), tap_relu=False, dilate=(False, True, False),
                                 trainable=('layer2', 'layer3'))
    plugin_point = 'prototypes'
    adaptation_defaults = Adaptation(steps=0, lr=5e-4)
    default_lr = 1e-3
    train_recipe = {'epochs': 20, 'bsz': 12, 'kshot': {'bsz': 6}}     # the public code's 1-shot / 5-shot settings

    # --- forward ------------------------------------------------------------------------------------------------
    def match(self, record: EpisodeRecord) -> Output:
        r"""Test: the refined prediction of one iteration. Training: also the support pass (aux for the loss)."""
        return self.mine(record, iterations=1, support_pass=self.training)

    def mine(self, record: EpisodeRecord, iterations: int, support_pass: bool) -> Output:
        r"""`iterations` BFP iterations (the first refined); with `support_pass`, the training outputs in `aux`:
        'iter1' (out₁), 'support' (each support from its own prototypes), 'support_iter1' (supp_out₁), 'later'
        (out_i, supp_out_i for i >= 2), 'query_feat' (for the self-prediction term), 'support_masks'."""
        fq, fs = record.query_feats[0], record.support_feats[0]
        b, k = record.batch, record.nshot
        # bilinear (aligned corners) in the features' dtype, as the reference's MAP
        mask = F.interpolate(record.ctx.support_masks.unsqueeze(1).to(fs.dtype), tuple(fs.shape[-2:]),
                             mode='bilinear', align_corners=True)
        pooled = masked_average_pooling(fs, torch.cat([mask, 1 - mask], dim=1), eps=PROTOTYPE_EPS)   # [B*K,2,C]
        fp = pooled[:, 0].view(b, k, -1).mean(dim=1, keepdim=True)                                   # [B,1,C]
        bp = pooled[:, 1].view(b, k, -1).mean(dim=1, keepdim=True)
        fp, bp = self.hooks.prototypes([fp], [bp], [fs], record.ctx)
        fp, bp = fp[0][:, 0, :, None, None], bp[0][:, 0, :, None, None]                              # [B,C,1,1]

        fp1, bp1 = mined_prototypes(fq, fp, similarity(fq, fp, bp))
        out1 = similarity(fq, fp1, bp1)
        fp2, bp2 = mined_prototypes(fq, fp, out1)                      # refinement (first iteration only)
        fp2 = 0.5 * fp + 0.2 * fp1 + 0.3 * fp2
        bp2 = 0.5 * bp + 0.2 * bp1 + 0.3 * bp2
        refined = 0.7 * similarity(fq, fp2, bp2) + 0.3 * out1
        if not support_pass:
            return Output(self.upsample(refined, record))

        aux = {'iter1': self.upsample(out1, record), 'query_feat': fq, 'support_masks': record.ctx.support_masks,
               'support': self.upsample(similarity(fs, pooled[:, 0, :, None, None], pooled[:, 1, :, None, None]),
                                        record)}
        later = []
        for it in range(iterations):
            if it > 0:                                                  # later iterations: no refinement
                fp1, bp1 = mined_prototypes(fq, fp, similarity(fq, fp, bp))
                out1 = similarity(fq, fp1, bp1)
            supp_out, fp, bp = support_pass_step(fs, fp, fp1, bp1, k)
            if it == 0:
                aux['support_iter1'] = self.upsample(supp_out, record)
            else:
                later.append((self.upsample(out1, record), self.upsample(supp_out, record)))
        aux['later'] = later
        return Output(self.upsample(refined, record), aux)

    # --- training -----------------------------------------------------------------------------------------------
    def loss(self, output: Output, batch: dict) -> dict[str, torch.Tensor]:
        r"""The reference's source loss (train.py:180-181), as named terms: 'refined' + 'iter1' + 'self' (the query
        from its own ground-truth prototypes) + 'support' (0.2) + 'support_iter1' (0.4), and 'later' (0.1 x each
        query and support term of iterations 2-3) when they were computed (adaptation). Without aux (test time,
        adapted outputs): 'refined' only. Pixels labelled 255 are ignored."""
        target = batch['query_mask'].long()
        terms = {'refined': _ce(output.logits, target)}
        aux = output.aux
        if not aux:
            return terms
        support = aux['support_masks'].long()
        fq = aux['query_feat']
        terms['iter1'] = _ce(aux['iter1'], target)
        terms['self'] = _ce(F.interpolate(self_similarity(fq, target), target.shape[-2:], mode='bilinear',
                                          align_corners=True), target)
        terms['support'] = 0.2 * _ce(aux['support'], support)
        terms['support_iter1'] = 0.4 * _ce(aux['support_iter1'], support)
        if aux['later']:
            terms['later'] = LATER_WEIGHT * sum(_ce(q, target) + _ce(s, support) for q, s in aux['later'])
        return terms

    def configure_optimizers(self, lr: float | None = None, total_steps: int = 1) -> Recipe:
        r"""SGD (lr 1e-3, momentum 0.9, weight decay 5e-4) over layer2/layer3 (a plug-in in its own group), lr ÷10
        twice (`milestones`); the scheduler is stepped after every optimizer step, so a drop at step s takes effect
        from step s on, as the reference's `if iters in lr_decay_iters`."""
        lr = lr or self.default_lr
        optimizer = torch.optim.SGD(self.param_groups([{'params': self.host_parameters()}], lr, adaptive=False),
                                    lr=lr, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY)
        if self.options.milestones == 'thirds':
            milestones = sorted({max(total_steps // 3, 1), max(2 * total_steps // 3, 1)})
        else:
            milestones = list(REFERENCE_MILESTONES)
        return Recipe(optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1))

    # --- target adaptation ----------------------------------------------------------------------------------------
    def adaptation_parameters(self, record: EpisodeRecord) -> list[torch.Tensor]:
        r"""The fine-tuned backbone weights (layer2/layer3 convs); the harness re-encodes the episode with them."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def adaptation_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        r"""The reference's adaptation optimizer (ifa.py:171-172), fresh for every episode."""
        return torch.optim.SGD(params, lr=self.adaptation.lr, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY)

    def adaptation_loss(self, record: EpisodeRecord, step: int) -> torch.Tensor:
        r"""One step on a pseudo-episode of the episode's own supports: pseudo-query = support k (k = 0 for K = 1,
        else drawn per step) under `pseudo_query_augmentation`, supports = all K (unaugmented), as the reference's
        `*_IFA.py` loaders; the loss is the full 3-iteration adaptation loss (ifa.py:217-221). The draws come from a
        generator seeded by the step, so every episode gets the same fixed schedule whatever the batch or order."""
        gen = torch.Generator().manual_seed(step)
        imgs, masks = record.supports.imgs, record.supports.masks                     # [1,K,3,H,W], [1,K,H,W]
        k = int(torch.randint(imgs.shape[1], (1,), generator=gen)) if imgs.shape[1] > 1 else 0
        img, mask = pseudo_query_augmentation(imgs[0, k], masks[0, k], gen)
        pseudo = self.encode(img[None], imgs, masks, record.ctx.class_id)              # gradients reach layer2/3
        output = self.mine(pseudo, iterations=ADAPT_ITERATIONS, support_pass=True)
        return sum(self.loss(output, {'query_mask': mask[None]}).values())


# --- the parameter-free parts ----------------------------------------------------------------------------------------
def similarity(feat: torch.Tensor, fp: torch.Tensor, bp: torch.Tensor) -> torch.Tensor:
    r"""10·[cos(F, BP), cos(F, FP)] along channels: feat [N,C,h,w], fp/bp [N,C,1,1] or [N,C,h,w] -> [N,2,h,w].
    Each vector is divided by max(||v||, 1e-8), as F.cosine_similarity does (about 10x faster than calling it on
    these broadcast shapes on CPU)."""
    unit = _unit(feat)
    return SCALE * torch.cat([(unit * _unit(bp)).sum(dim=1, keepdim=True),
                              (unit * _unit(fp)).sum(dim=1, keepdim=True)], dim=1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)


def self_similarity(feat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""The query predicted from its own ground-truth prototypes MAP(F_q, M==1), MAP(F_q, M==0) (pixels labelled 255
    count for neither; the masks are resized bilinearly as the reference's MAP): [B,2,h,w] at feature size."""
    masks = torch.stack([target == 1, target == 0], dim=1).to(feat.dtype)                 # [B,2,H,W]
    masks = F.interpolate(masks, tuple(feat.shape[-2:]), mode='bilinear', align_corners=True)
    pooled = masked_average_pooling(feat, masks, eps=PROTOTYPE_EPS)                        # [B,2,C]
    return similarity(feat, pooled[:, 0, :, None, None], pooled[:, 1, :, None, None])


def mined_prototypes(feat: torch.Tensor, fp: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One mining step (I:203-208): with (SSFP, SSBP, ASBP) = SSP(F, out), FP' = 0.5 FP + 0.5 SSFP [N,C,1,1] and
    BP' = 0.3 SSBP + 0.7 ASBP [N,C,h,w]."""
    ssfp, ssbp, asbp = ssp(feat, out)
    return 0.5 * fp + 0.5 * ssfp, 0.3 * ssbp + 0.7 * asbp


def support_pass_step(fs: torch.Tensor, fp: torch.Tensor, fp1: torch.Tensor, bp1: torch.Tensor,
                      nshot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The query -> support pass of one iteration (I:225-269): the supports F_s [B*K,...] are matched with the
    query's mined (FP₁, BP₁), mined themselves from the iteration's input FP [B,...]; returns supp_out [B*K,2,h,w]
    and the next iteration's (FP, BP), the shot means of the supports' mined prototypes."""
    fp1, bp1, fp = (x.repeat_interleave(nshot, dim=0) for x in (fp1, bp1, fp))           # batch-major [B*K,...]
    fp_s, bp_s = mined_prototypes(fs, fp, similarity(fs, fp1, bp1))
    out = similarity(fs, fp_s, bp_s)
    return out, _shot_mean(fp_s, nshot), _shot_mean(bp_s, nshot)


def _shot_mean(x: torch.Tensor, nshot: int) -> torch.Tensor:
    return x.view(-1, nshot, *x.shape[1:]).mean(dim=1)


def _confident(prob: torch.Tensor, threshold: float) -> torch.Tensor:
    r"""[N,hw] -> bool mask of the pixels with prob > threshold, or of the top 12 where no pixel passes."""
    passed = prob > threshold
    top = torch.zeros_like(passed).scatter_(1, prob.topk(min(TOP_K, prob.shape[1]), dim=1).indices, True)
    return torch.where(passed.any(dim=1, keepdim=True), passed, top)


def ssp(feat: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Self-support prototypes (`SSP_func`, I:125-184), for all N maps at once with masked means and a softmax over
    each map's selected background pixels, gathered and padded to the largest selection (the reference loops over
    the maps and gathers them; attending over every pixel and masking cost 36 % of a 400x400 1-shot episode).

    Args:
        feat: [N,C,h,w]; out: [N,2,h,w] logits (channels bg, fg).
    Returns:
        SSFP, SSBP [N,C,1,1] (mean feature of the confident fg / bg pixels) and ASBP [N,C,h,w]: per pixel x,
        Σ_j softmax_j(2·<f̂_x, f̂_j>) f_j over the selected background pixels j (the reference's unused local
        foreground prototype is not computed). Gradients flow through the features and the weights, not through the
        selection.
    """
    n, c, h, w = feat.shape
    prob = out.softmax(dim=1).flatten(2)                                                    # [N,2,hw]
    fg_sel = _confident(prob[:, 1], FG_THRESHOLD).to(feat.dtype)                            # [N,hw]
    bg_sel = _confident(prob[:, 0], BG_THRESHOLD)
    x = feat.flatten(2)                                                                     # [N,C,hw]
    sel = torch.stack([fg_sel, bg_sel.to(feat.dtype)], dim=1)                              # [N,2,hw]
    means = (sel @ x.transpose(1, 2)) / sel.sum(dim=2, keepdim=True)                       # [N,2,C]
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    # only the selected background pixels j enter: each map's come first (a stable sort), up to the largest count,
    # and the padding of maps with fewer is masked out of the softmax
    selected = int(bg_sel.sum(dim=1).max())
    order = torch.sort(bg_sel.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :selected]
    valid = bg_sel.gather(1, order)                                                        # [N,m]
    order = order[:, None, :].expand(-1, c, -1)
    logits = LOCAL_TEMPERATURE * (unit.transpose(1, 2) @ unit.gather(2, order))            # [N,hw(x),m]
    weights = logits.masked_fill(~valid[:, None, :], float('-inf')).softmax(dim=-1)
    local_bg = (x.gather(2, order) @ weights.transpose(1, 2)).view(n, c, h, w)             # Σ_j w_xj f_j
    return means[:, 0, :, None, None], means[:, 1, :, None, None], local_bg


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r"""[3,H,W] RGB in [0, 1] -> HSV with hue in [0, 1) (a fraction of the circle), saturation and value in [0, 1]."""
    value, top = rgb.max(dim=0)
    delta = value - rgb.min(dim=0).values
    safe = delta.clamp_min(1e-12)
    r, g, b = rgb
    hue = torch.where(top == 0, (g - b) / safe, torch.where(top == 1, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value)), value])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    r"""The inverse of `rgb_to_hsv`."""
    hue, sat, value = hsv
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(3, 1, 1) + hue * 6) % 6
    return value - value * sat * torch.minimum(k, 4 - k).clamp(0, 1)


def shift_hsv(img01: torch.Tensor, hue: float, sat: float, value: float) -> torch.Tensor:
    r"""Albumentations' HueSaturationValue with the given shifts in its (OpenCV) units: hue in 1/180 of the circle,
    added modulo the circle; saturation and value in 1/255, added and clipped to [0, 1]. On [0, 1] RGB [3,H,W],
    computed in floating point (the reference works on uint8 look-up tables: the same map up to rounding)."""
    h, s, v = rgb_to_hsv(img01)
    hsv = torch.stack([(h + hue / 180) % 1.0, (s + sat / 255).clamp(0, 1), (v + value / 255).clamp(0, 1)])
    return hsv_to_rgb(hsv)


def pseudo_query_augmentation(img: torch.Tensor, mask: torch.Tensor,
                              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The pseudo-query of one adaptation step, as the reference's `q_transform` + `q_transform2`: horizontal and
    vertical flips with p 0.5 each and a random multiple of 90° with p 0.5 (only 0° or 180° for non-square images,
    which must keep their size) on image and mask; then on the image RandomBrightnessContrast (p 0.5, ±0.2 each, on
    [0, 1] intensities) and HueSaturationValue (always; shifts uniform in ±20 hue, ±30 saturation, ±20 value, in
    OpenCV's units, `shift_hsv`). img [3,H,W] ImageNet-normalised, mask [H,W].
    """
    draws = torch.rand(9, generator=gen).tolist()
    quarter = int(torch.randint(4, (1,), generator=gen))
    if draws[0] < 0.5:
        img, mask = img.flip(-1), mask.flip(-1)
    if draws[1] < 0.5:
        img, mask = img.flip(-2), mask.flip(-2)
    if draws[2] < 0.5:
        turns = quarter if img.shape[-1] == img.shape[-2] else 2 * (quarter % 2)
        img, mask = img.rot90(turns, (-2, -1)), mask.rot90(turns, (-2, -1))
    mean = img.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = img.new_tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (img * std + mean).clamp(0, 1)
    if draws[3] < 0.5:
        contrast, brightness = 1 + 0.4 * (draws[4] - 0.5), 0.4 * (draws[5] - 0.5)
        rgb = (rgb * contrast + brightness).clamp(0, 1)
    rgb = shift_hsv(rgb, 40 * (draws[6] - 0.5), 60 * (draws[7] - 0.5), 40 * (draws[8] - 0.5))
    return ((rgb - mean) / std).contiguous(), mask.contiguous()


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)

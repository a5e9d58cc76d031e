r"""Q-Net: query-informed few-shot medical image segmentation (Shen, Li, Qiao, Ma & Zhou, 2022/2023).

A ResNet-101 (or ResNet-50) with dilated layer3 and layer4 gives two paths, each reduced to 512 channels by a 1x1
conv without bias; one foreground prototype per path (masked average pooling at image resolution, averaged over the
shots; there is no background prototype); a threshold T from the *query's* pooled layer4 features through the
ResNet's 1000-way fc and a Linear(1000, 1); per path

    p_fg = 1 - σ(0.5 · (-20 · cos(f_q, FP) - T)) = σ(0.5 · (20 · cos(f_q, FP) + T)),

upsampled to the image and mixed with path weights 0.9 / 0.1. Training: weighted NLL (background 0.1) plus the
prototype alignment loss (query prototype from the predicted mask, predicting each support). Test time: the
query-informed prototype refinement, a few Adam steps per episode on the prototypes (`adaptation_loss`).

The log-probabilities are the reference's log(clamp(p, ε, 1 - ε)) (ε = float32's machine epsilon;
`clamped_log_probabilities`). Their gradient is exactly zero wherever the mix saturates, so a threshold that
overshoots (T reached -1e5 within 40 steps of a synthetic run on a random backbone) is never corrected;
`--log-prob exact` computes them exactly in log space instead (`mixture_log_probabilities`), with a gradient
everywhere.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.constants import IGNORE_INDEX
from model.backbone import Backbone, BackboneSpec
from model.base import Adaptation, EpisodeRecord, FewShotSegmenter, Output, Recipe, option
from model.layers import Conv2d

WIDTH = 512           # width of both paths (reduce1, reduce2)
SCALE = 20.0          # cosine scale (`scaler`)
PROTO_EPS = 1e-5      # masked average pooling Σ f·m / (Σ m + 1e-5), as `getFeatures`
BG_WEIGHT = 0.1       # NLL weight of background pixels (config `bg_wt`)
# SGD of the reference (config.py, train.py): momentum, weight decay; LR × 0.98 every 1000 steps
MOMENTUM, WEIGHT_DECAY, LR_GAMMA, LR_EVERY = 0.9, 5e-4, 0.98, 1000


# --- the maths ------------------------------------------------------------------------------------------------------
def path_logit(cos: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    r"""x = 0.5 (20 cos + T), so that Q-Net's `getPred` p = 1 - σ(0.5 (-20 cos - T)) = σ(x). cos [N,h,w], threshold
    [N] (one T per query)."""
    return 0.5 * (SCALE * cos + threshold.view(-1, 1, 1))


def _corners(n_out: int, n_in: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Source indices i0, i1 and weight of i1 of 1-D linear interpolation with aligned corners."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, dtype=torch.float64, device=device) * scale
    i0 = src.floor().long().clamp(max=n_in - 1)
    return i0, (i0 + 1).clamp(max=n_in - 1), src - i0


def log_upsample(log_p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    r"""log(bilinear upsampling (aligned corners) of exp(log_p)), exactly and stably: the interpolation is separable
    and positive, so per axis log(a e^u + b e^v) = logaddexp(log a + u, log b + v). [N,h,w] -> [N,H,W]."""
    for dim, n_out in ((1, size[0]), (2, size[1])):
        n_in = log_p.shape[dim]
        if n_in == n_out:
            continue
        i0, i1, frac = _corners(n_out, n_in, log_p.device)
        view = [1, 1, 1]
        view[dim] = n_out
        w0 = torch.log1p(-frac).to(log_p.dtype).view(view)
        w1 = torch.log(frac).to(log_p.dtype).view(view)                    # -inf where the weight is 0: exact
        log_p = torch.logaddexp(log_p.index_select(dim, i0) + w0, log_p.index_select(dim, i1) + w1)
    return log_p


def mixture_log_probabilities(logits: list[torch.Tensor], weights: torch.Tensor,
                              size: tuple[int, int]) -> torch.Tensor:
    r"""[log(1 - p), log p] [N,2,H,W] of p = Σ_n w_n up(σ(x_n)) / Σ w (Q-Net's path mix of bilinearly upsampled
    probabilities), in log space: log up(σ(x)) = log_upsample(logsigmoid(x)), and 1 - p = Σ_n w_n up(σ(-x_n)) / Σ w
    because the interpolation and mixing weights sum to 1. Equal to the reference's log(clamp(p, ε, 1 - ε)) wherever
    that does not clamp, with a gradient everywhere (bounded: |∂ log σ(x) / ∂x| <= 1)."""
    log_w = (weights / weights.sum()).log()
    out = []
    for sign in (-1.0, 1.0):                                                # background, foreground
        terms = [lw + log_upsample(F.logsigmoid(sign * x), size) for lw, x in zip(log_w, logits)]
        out.append(torch.logsumexp(torch.stack(terms), dim=0))
    return torch.stack(out, dim=1)


def clamped_log_probabilities(logits: list[torch.Tensor], weights: torch.Tensor,
                              size: tuple[int, int]) -> torch.Tensor:
    r"""The reference's [log(1 - p), log p] [N,2,H,W]: p = Σ_n w_n up(σ(x_n)) / Σ w with bilinear upsampling
    (aligned corners), both columns clamped to [ε, 1 - ε] before the log (ε = float32's machine epsilon, whatever
    the dtype, as `train.py`)."""
    p = sum(w * F.interpolate(torch.sigmoid(x).unsqueeze(1), size, mode='bilinear', align_corners=True)
            for w, x in zip(weights, logits)) / weights.sum()
    eps = torch.finfo(torch.float32).eps
    return torch.log(torch.clamp(torch.cat([1.0 - p, p], dim=1), eps, 1 - eps))


def interpolation_matrix(n_out: int, n_in: int, dtype: torch.dtype, device) -> torch.Tensor:
    r"""[n_out, n_in] matrix A of 1-D linear interpolation without aligned corners: A @ v = F.interpolate(v)."""
    eye = torch.eye(n_in, dtype=dtype, device=device).unsqueeze(0)                       # [1,n_in(ch),n_in]
    return F.interpolate(eye, size=n_out, mode='linear', align_corners=False)[0].transpose(0, 1)


def upsampled_average_pooling(feat: torch.Tensor, mask: torch.Tensor, eps: float = PROTO_EPS) -> torch.Tensor:
    r"""MAP of the features bilinearly upsampled to the mask's size, Σ_xy up(f)·m / (Σ_xy m + eps) (Q-Net's
    `getFeatures`, align_corners=False), computed at feature resolution.

    Bilinear upsampling is separable, up(f) = A f Bᵀ, so Σ_xy up(f)_xy m_xy = Σ_ij f_ij (Aᵀ m B)_ij: the mask is
    pulled back to the feature grid once and no C x H x W map is made (at 400² that map is 330 MB per support).
    feat [N,C,h,w], mask [N,H,W] -> [N,C].
    """
    h, w = feat.shape[-2:]
    a = interpolation_matrix(mask.shape[-2], h, feat.dtype, feat.device)                 # [H,h]
    b = interpolation_matrix(mask.shape[-1], w, feat.dtype, feat.device)                 # [W,w]
    weights = a.transpose(0, 1) @ mask.to(feat.dtype) @ b                                # [N,h,w]
    pooled = (feat.flatten(2) @ weights.flatten(1).unsqueeze(-1)).squeeze(-1)           # [N,C]
    return pooled / (mask.flatten(1).sum(dim=1, keepdim=True).to(feat.dtype) + eps)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    r"""(x - min) / (max - min) over all elements (global scalars, as the reference)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def refinement_loss(feat: torch.Tensor, proto: torch.Tensor, fg: torch.Tensor,
                    squashed: torch.Tensor | None = None) -> torch.Tensor:
    r"""The released refinement objective (models/fewshot.py `updatePrototype`) of one path.

    feat [1,C,h,w] query features, proto [1,C] the prototype being refined, fg [1,h,w] the current hard prediction.
    The predicted-foreground feature vectors are replaced by the prototype, f̃ = f (1 - M) + FP M (with M binary:
    exactly `where(M, FP, f)`), and loss = BCE(input = σ(minmax f), target = σ(minmax f̃)) with global min/max; the
    gradient reaches the prototype through the *target* (argument order as the reference; swapping them changes the
    objective). `squashed`: σ(minmax f), which depends on the features only (a refinement computes it once).
    """
    new = torch.where(fg.unsqueeze(1), proto[:, :, None, None], feat)
    if squashed is None:
        squashed = torch.sigmoid(_minmax(feat))
    return F.binary_cross_entropy(squashed, torch.sigmoid(_minmax(new)))


# --- the method -----------------------------------------------------------------------------------------------------
@dataclass
class QNetOptions:
    path_weight: float = option(0.9, help='weight of the layer3 path in the mix of the two paths (layer4: 1 - w; '
                                          "the paper's setting 2 uses 0.6)", low=0.0, high=1.0)
    geometry: str = option('reference', choices=('reference', 'stride8'),
                           help="backbone dilation: reference (default; the public code's [True, True, False]: "
                                'layer3 path at 1/4, layer4 path at 1/8 of the image) or stride8 (dilated layer3 and '
                                'layer4, both paths at 1/8: about 3x cheaper, our earlier default)')
    bn: str = option('trained', choices=('trained', 'frozen'),
                     help='backbone BatchNorm in training: trained (default; the public code: batch statistics over '
                          'the supports and query, affine parameters learned) or frozen (ImageNet statistics and '
                          'affine kept; our earlier default)')
    log_prob: str = option('clamped', choices=('clamped', 'exact'),
                           help="log-probabilities of the losses: clamped (default; the public code's "
                                'log(clamp(p, eps, 1 - eps)), no gradient where it saturates) or exact (log space, a '
                                'gradient everywhere; our earlier default)')


class QNet(FewShotSegmenter):
    r"""Q-Net trained with ground-truth masks (PASCAL or any source benchmark).

    Backbone: torchvision's ResNet-101 with the reference's dilation (layer2 and layer3 dilated: paths at 1/4 and
    1/8; `--geometry stride8`: both at 1/8); its initial weights are ImageNet's unless `--backbone-weights
    deeplabv3-coco` (the reference's). BatchNorm as the reference (`--bn trained`: batch statistics over the supports
    and the query in training, affine parameters learned; `--bn frozen`: ImageNet's kept). Deviations from the public
    code (docs/methods.md, "Q-Net"): episodes of a batch and their K shots are indexed correctly and each query uses its
    own T (the reference mixes episodes when B > 1 and K > 1 and broadcasts the whole batch's T). Training recipe:
    the reference's gamma + affine + elastic augmentation (data/augment.py `GammaAffineElastic`), label 255 ignored.

    Test-time adaptation (on by default, `test.py --finetune-steps/--finetune-lr`): 30 Adam steps at lr 2e-3 per
    episode on the two path prototypes (after a plug-in has fused them), with the released refinement objective
    (`refinement_loss`), the prediction recomputed after every step; nothing carries over to the next episode.
    """

    kshot = 'joint'
    Options = QNetOptions
    backbone_spec = BackboneSpec(taps=('layer3', 'layer4'), dilate=(True, True, False), keep_fc=True,
                                 trainable=('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc'))
    legacy_options = {'geometry': 'stride8', 'bn': 'frozen', 'log_prob': 'exact'}   # checkpoints before the options
    train_recipe = {'train_boundary': 'ignore',          # the public code's NLLLoss(ignore_index=255)
                    'augmentation': 'gamma-affine-elastic'}      # and its gamma + affine + elastic transform
    default_backbone = 'resnet101'
    plugin_point = 'prototypes'       # CD-TG fuses text into the foreground prototypes (no background prototype)
    adaptation_defaults = Adaptation(steps=30, lr=2e-3)
    default_lr = 1e-3

    def __init__(self, backbone: Backbone, options: QNetOptions | None = None):
        super().__init__(backbone, options)
        self.reduce = nn.ModuleList([Conv2d(c, WIDTH, 1, bias=False) for c in backbone.channels])
        for conv in self.reduce:      # the reference's `_init_weights`
            nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
        # reduce1d: T = Linear(1000, 1)(fc(pool(layer4))); no nonlinearity in between, as the reference
        self.threshold_head = nn.Linear(backbone.net.fc.out_features, 1)

    @classmethod
    def spec_for(cls, options) -> BackboneSpec:
        spec = dataclasses.replace(cls.backbone_spec, bn=options.bn)
        if options.geometry == 'stride8':
            return dataclasses.replace(spec, dilate=(False, True, True))
        return spec

    @property
    def feature_channels(self) -> list[int]:
        return [WIDTH] * len(self.reduce)

    @property
    def feature_levels(self) -> list[int]:
        return list(self.backbone.stage_ids)

    # --- forward ------------------------------------------------------------------------------------------------
    def paths(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        r"""The two 512-d paths [N,512,h,w] from the layer3 and layer4 taps."""
        return [reduce(tap) for reduce, tap in zip(self.reduce, taps)]

    def threshold(self, query_taps: list[torch.Tensor]) -> torch.Tensor:
        r"""T [B] of each query: Linear(1000, 1) of the ResNet's fc of its globally pooled layer4 map."""
        pooled = query_taps[-1].mean(dim=(2, 3))
        return self.threshold_head(self.backbone.net.fc(pooled)).squeeze(1)

    def prototypes(self, support_paths: list[torch.Tensor], record: EpisodeRecord) -> list[torch.Tensor]:
        r"""Per path FP [B,512]: MAP at image resolution per support, averaged over the K shots, then the plug-in's
        `prototypes` hook (sets of one prototype per episode; no background prototype)."""
        b, k = record.batch, record.nshot
        fg = [upsampled_average_pooling(s, record.ctx.support_masks).view(b, k, -1).mean(dim=1, keepdim=True)
              for s in support_paths]
        fg, _ = self.hooks.prototypes(fg, [None] * len(fg), support_paths, record.ctx)
        return [f[:, 0] for f in fg]

    def path_logits(self, paths: list[torch.Tensor], protos: list[torch.Tensor],
                    threshold: torch.Tensor) -> list[torch.Tensor]:
        r"""x per path at feature resolution [N,h,w], p_fg = σ(x)."""
        return [path_logit(F.cosine_similarity(f, p[:, :, None, None], dim=1, eps=1e-8), threshold)
                for f, p in zip(paths, protos)]

    def log_probabilities(self, logits: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        r"""[log(1 - p), log p] [N,2,H,W] of the paths upsampled to `size` and mixed with the path weights
        (`--log-prob`: clamped as the reference, or exact)."""
        w = self.options.path_weight               # made in the maps' dtype (a float32 0.9 is 0.89999998)
        weights = torch.tensor([w, 1.0 - w], dtype=logits[0].dtype, device=logits[0].device)
        if self.options.log_prob == 'clamped':
            return clamped_log_probabilities(logits, weights, size)
        return mixture_log_probabilities(logits, weights, size)

    def match(self, record: EpisodeRecord) -> Output:
        query = self.paths(record.query_feats)
        support = self.paths(record.support_feats)
        threshold = self.threshold(record.query_feats)
        protos = record.state.get('prototypes')                # refined by test-time adaptation
        if protos is None:
            protos = self.prototypes(support, record)
        logits = self.log_probabilities(self.path_logits(query, protos, threshold), record.image_size)
        return Output(logits, {'query_paths': query, 'support_paths': support, 'threshold': threshold})

    # --- training -----------------------------------------------------------------------------------------------
    def loss(self, output: Output, batch: dict) -> dict[str, torch.Tensor]:
        r"""'nll': NLL of the log-probabilities with class weights [0.1, 1] (pixels labelled 255 ignored);
        'align': the prototype alignment loss (when the output carries what it needs; outputs of test-time
        adaptation do not)."""
        weight = output.logits.new_tensor([BG_WEIGHT, 1.0])
        terms = {'nll': F.nll_loss(output.logits, batch['query_mask'].long(), weight=weight,
                                   ignore_index=IGNORE_INDEX)}
        if 'threshold' in output.aux:
            terms['align'] = self.alignment_loss(output.aux, output.logits, batch['support_masks'])
        return terms

    def alignment_loss(self, aux: dict, logits: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        r"""Q-Net's `alignLoss` for B episodes of K shots.

        Per episode: the predicted query mask ŷ = argmax([1 - p, p]) at image size (no foreground: the episode adds
        0); per path the query prototype MAP(up(f_q), ŷ); each support predicted from it with the *query's* T,
        upsampled, mixed like the query; unweighted NLL against the support mask, averaged over pixels, summed over
        shots / K; the sum over episodes / B.
        """
        b, k = support_masks.shape[:2]
        size = tuple(support_masks.shape[-2:])
        pred = (logits[:, 1] > logits[:, 0]).to(logits.dtype)                   # argmax: ties go to background
        q_protos = [upsampled_average_pooling(f, pred).repeat_interleave(k, dim=0) for f in aux['query_paths']]
        t = aux['threshold'].repeat_interleave(k)
        log_p = self.log_probabilities(self.path_logits(aux['support_paths'], q_protos, t), size)   # [B*K,2,H,W]
        target = support_masks.flatten(0, 1).long()
        nll = F.nll_loss(log_p, target, reduction='none').flatten(1).mean(dim=1)                     # [B*K]
        has_fg = (pred.flatten(1).sum(dim=1) > 0).to(nll.dtype)
        return (nll.view(b, k).sum(dim=1) / k * has_fg).sum() / b

    def configure_optimizers(self, lr: float | None = None, total_steps: int = 1) -> Recipe:
        r"""The reference's SGD (lr 1e-3, momentum 0.9, weight decay 5e-4) on every trainable parameter; the LR is
        multiplied by 0.98 every 1000 steps (milestones 1000, 2000, ... below `total_steps`), stepped per step."""
        lr = lr or self.default_lr
        optimizer = torch.optim.SGD(self.param_groups([{'params': self.host_parameters()}], lr, adaptive=False),
                                    lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        milestones = list(range(LR_EVERY, max(int(total_steps), 1), LR_EVERY))
        return Recipe(optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=LR_GAMMA))

    # --- test-time query-informed prototype refinement ------------------------------------------------------------
    def adaptation_parameters(self, record: EpisodeRecord) -> list[torch.Tensor]:
        r"""The episode's path prototypes (after the plug-in hook), as fresh leaf tensors in `record.state`; the query
        paths and T are fixed during refinement and kept there too."""
        with torch.no_grad():
            protos = self.prototypes(self.paths(record.support_feats), record)
            # contiguous once: the steps' elementwise work then makes no layout copies of the channels-last maps
            paths = record.state['query_paths'] = [p.contiguous() for p in self.paths(record.query_feats)]
            record.state['squashed'] = [torch.sigmoid(_minmax(f)) for f in paths]     # the BCE input: fixed
            record.state['threshold'] = self.threshold(record.query_feats)
        record.state['prototypes'] = [p.detach().clone().requires_grad_(True) for p in protos]
        return record.state['prototypes']

    def adaptation_loss(self, record: EpisodeRecord, step: int) -> torch.Tensor:
        r"""One refinement step: per path, the hard mask of the current prediction (p_fg > 0.5 at feature
        resolution, this path only), then `refinement_loss`; summed over the paths (Adam is element-wise, so this
        equals the reference's separate optimisation of each path)."""
        state = record.state
        with torch.no_grad():
            logits = self.path_logits(state['query_paths'], state['prototypes'], state['threshold'])
        return sum(refinement_loss(f, p, x > 0, s)                              # p_fg = σ(x) > 0.5
                   for f, p, x, s in zip(state['query_paths'], state['prototypes'], logits, state['squashed']))

r"""PMMs and RPMMs: Prototype Mixture Models for few-shot segmentation (Yang, Liu, Li, Jiao & Ye, ECCV 2020).

Both share a dilated ResNet-50 (output stride 8) whose layer2 and layer3 maps are fused to 256 channels, an EM that
summarises the foreground and the background support pixels by k prototypes each, and a dense-comparison head:

    s, q      = fuse(cat(layer2, layer3))                      support / query maps [*,256,h,w]
    μ_f, μ_b  = EM(m·s), EM((1-m)·s)                           k unit prototypes each (10 iterations, κ = 20)
    P         = softmax over the 2k components of qᵀμ          summed into [P_bg, P_fg]
    x         = Σ_i compare(cat(q, tile(μ_f,i)))                dense comparison with every foreground component
    logits    = classifier(psp(residual blocks(x, history)))  at feature resolution, then bilinear to the image

PMMs (k = 3) uses P as the history of the residual blocks; RPMMs (the residual cascade the CD-FSS tables call
"RPMMs") runs three stages with k = 1, 3, 6 that share every weight: P is concatenated to x and each stage's
softmax is the next stage's history. The reference names of the modules are given next to ours.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.backbone import Backbone, BackboneSpec
from model.base import EpisodeRecord, FewShotSegmenter, Output, Recipe, option
from model.layers import Conv2d, resize_mask

WIDTH = 256           # width of the fused feature map and of the prototypes
EM_ITERS = 10         # EM iterations (stage_num)
KAPPA = 20.0          # concentration of the E-step
EPS = 1e-6            # the reference's epsilon of the L2 normalisation and of the M-step
POLY_POWER = 0.9
# SGD of the reference (utils/my_optim.py): momentum, weight decay, LR multipliers of the four parameter groups
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
LR_MULT = {'backbone_weight': 1.0, 'backbone_bias': 2.0, 'weight': 10.0, 'bias': 20.0}


# --- the maths ------------------------------------------------------------------------------------------------------
def l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    r"""x / (1e-6 + ||x||) along `dim`, as the reference's `_l2norm`."""
    return x / (EPS + x.norm(dim=dim, keepdim=True))


def em_init(channels: int, k: int, generator: torch.Generator) -> torch.Tensor:
    r"""The EM initialisation [C,k]: N(0, std √(2/k)) then L2-normalised over the channels (random unit directions),
    drawn from `generator` (the reference draws it from the unseeded CUDA RNG in every forward of RPMMs)."""
    return l2_normalize(torch.randn(channels, k, generator=generator) * math.sqrt(2.0 / k), dim=0)


def em_prototypes(x: torch.Tensor, mu0: torch.Tensor, iters: int = EM_ITERS, kappa: float = KAPPA) -> torch.Tensor:
    r"""The EM of PMMs (models/PMMs.py `EM`) on N sets of pixels, without gradient as the reference.

    x [N,C,n] (masked features; masked-out pixels are zero vectors: their responsibilities are uniform and only
    change each component's normaliser, which the L2 normalisation removes), mu0 [C,k] the unit-norm initialisation
    shared by all sets. Per iteration:
        E-step  z = softmax_k(κ xᵀμ)                              [N,n,k]
        M-step  μ = normalize_C(x · z / (1e-6 + Σ_n z))          [N,C,k]
    Returns the prototypes [N,k,C] (unit norm). For k = 1 the result is the normalised sum of x, whatever mu0.
    """
    with torch.no_grad():
        mu = mu0.to(x.dtype).expand(x.shape[0], -1, -1)
        xt = x.transpose(1, 2)                                                 # [N,n,C]
        for _ in range(iters):
            z = torch.softmax(kappa * (xt @ mu), dim=2)                        # [N,n,k]
            z = z / (EPS + z.sum(dim=1, keepdim=True))
            mu = l2_normalize(x @ z, dim=1)                                    # [N,C,k]
    return mu.transpose(1, 2)


def probability_map(query: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    r"""PMMs' probability map (`discriminative_model`): [N,2,h,w] = [Σ_bg, Σ_fg] of softmax over the 2k components of
    qᵀμ, background first. query [N,C,h,w] raw features, fg/bg [N,k,C].

    The reference computes it under no_grad. Here only the query is detached: the prototypes come out of the
    no-grad EM, so for the plain method this is the same thing, while prototypes fused by a plug-in (CD-TG's text
    prototypes) keep a gradient path through P (otherwise the background text would never be trained).
    """
    k = fg.shape[1]
    logits = torch.cat([fg, bg], dim=1) @ query.detach().flatten(2)           # [N,2k,hw]
    p = torch.softmax(logits, dim=1)
    prob = torch.stack([p[:, k:].sum(dim=1), p[:, :k].sum(dim=1)], dim=1)     # [N,2,hw]
    return prob.view(query.shape[0], 2, *query.shape[-2:])


def dense_comparison(conv: nn.Conv2d, query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    r"""conv(cat(query, tile(μ_i))) for every prototype i, without building the k concatenated maps.

    query [N,C,h,w], protos [N,k,C] -> [N,k,C_out,h,w] (the conv's output before its activation). The conv is linear
    in its input: its query half W_q is applied once, and its prototype half applied to a constant map is
    Σ_t (W_p,t μ_i) · valid_t(p), where valid_t(p) = 1 where the tap t of pixel p falls inside the map (zero padding).
    Exact, and k times fewer 3x3 convolutions over the map (RPMMs: 1 instead of 10 per forward).
    """
    c = query.shape[1]
    w_q, w_p = conv.weight[:, :c], conv.weight[:, c:]                          # [O,C,kh,kw] each
    out_q = F.conv2d(query, w_q, conv.bias, conv.stride, conv.padding, conv.dilation)          # [N,O,h,w]
    kh, kw = w_p.shape[-2:]
    taps = torch.eye(kh * kw, dtype=query.dtype, device=query.device).view(kh * kw, 1, kh, kw)
    ones = query.new_ones(1, 1, *query.shape[-2:])
    valid = F.conv2d(ones, taps, None, conv.stride, conv.padding, conv.dilation)[0]            # [T,h,w]
    per_tap = torch.einsum('oct,nkc->nkot', w_p.flatten(2), protos)                             # [N,k,O,T]
    out_p = torch.einsum('nkot,thw->nkohw', per_tap, valid)
    return out_q.unsqueeze(1) + out_p


def stage_mean_log_probabilities(stages: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    r"""RPMMs' K-shot prediction (`FRPMMs.forward_5shot`): log of the mean of the stages' softmax, bilinearly
    upsampled to `size`. stages: logits [N,2,h,w] at feature resolution -> [N,2,H,W].

    The reference sums the softmax of its 3 stages, divides by 5, upsamples that and takes a softmax of it as its
    probability. Its argmax, the prediction, is the argmax here (a positive multiple of the same upsampled map);
    the softmax of these logits is the mean probability itself (a convex combination of distributions, which
    bilinear upsampling keeps one).
    """
    mean = torch.stack([torch.softmax(s, dim=1) for s in stages]).mean(dim=0)
    mean = F.interpolate(mean, size, mode='bilinear', align_corners=False)
    return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()


def poly_schedule(total_steps: int, power: float = POLY_POWER):
    r"""LR factor (1 - step / total_steps)^power of the reference's `adjust_learning_rate_poly`, per step."""
    total = max(int(total_steps), 1)
    return lambda step: max(0.0, 1.0 - step / total) ** power


# --- the head -----------------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Conv2d:
    return Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=True)


class PSPHead(nn.Module):
    r"""The reference's `PSPnet` (models/ASPP.py), an ASPP-like block: global pool + 1x1, 1x1, and 3x3 convs with
    dilation 6, 12, 18, each -> ReLU -> Dropout2d(0.5); concatenated to 5·256 channels."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.branches = nn.ModuleList([_conv(width, width, 1), _conv(width, width, 1)]
                                      + [_conv(width, width, 3, d) for d in (6, 12, 18)])
        self.dropout = nn.Dropout2d(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.dropout(torch.relu(self.branches[0](x.mean(dim=(2, 3), keepdim=True))))
        out = [pooled.expand(-1, -1, *x.shape[-2:])]
        out += [self.dropout(torch.relu(branch(x))) for branch in self.branches[1:]]
        return torch.cat(out, dim=1)


class ResidualBlock(nn.Module):
    r"""ReLU -> conv3x3 -> ReLU -> conv3x3 (pre-activation, no normalisation), added to its input by the caller."""

    def __init__(self, cin: int, width: int = WIDTH):
        super().__init__()
        self.conv1, self.conv2 = _conv(cin, width), _conv(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(torch.relu(x))))


# --- the methods --------------------------------------------------------------------------------------------------
GEOMETRY_HELP = ("backbone geometry: reference (default; the public code's DeepLab-v2 ResNet: layer2's stride in its "
                 "first 1x1 conv, ceil-mode stem max-pool, every layer3 block dilated 2) or torchvision (torchvision's "
                 "v1.5 ResNet with dilated layer3, our earlier default: cheaper, not the published network)")


BN_HELP = ("backbone BatchNorm in training: batch (default; the public code's train mode: batch statistics, running "
           "statistics updated, affine frozen) or frozen (ImageNet statistics kept; our earlier default)")


@dataclass
class PMMsOptions:
    components: int = option(3, help='mixture components per foreground and per background (k; the paper: 3)',
                             low=1, high=64)
    em_seed: int = option(0, help='seed of the fixed EM initialisation (a buffer, saved in checkpoints)', low=0)
    geometry: str = option('reference', help=GEOMETRY_HELP, choices=('reference', 'torchvision'))
    bn: str = option('batch', help=BN_HELP, choices=('batch', 'frozen'))


@dataclass
class RPMMsOptions:
    em_seed: int = option(0, help='seed of the fixed EM initialisation (a buffer, saved in checkpoints)', low=0)
    geometry: str = option('reference', help=GEOMETRY_HELP, choices=('reference', 'torchvision'))
    bn: str = option('batch', help=BN_HELP, choices=('batch', 'frozen'))
    kshot_prediction: str = option('stages', choices=('stages', 'last'),
                                   help='K > 1 at test time: stages (default; the public code: the mean of the three '
                                        "stages' probabilities) or last (the last stage, as for one shot)")


class PMMs(FewShotSegmenter):
    r"""PMMs (the reference's networks/FPMMs.py): one EM with k components (`--components`, 3), the probability map
    as the history of the residual blocks, BatchNorm in the comparison and projection layers.

    Backbone: the reference's geometry (`--geometry reference`, default: DeepLab-v2 strides and dilations) loaded
    with torchvision's ImageNet tensors, as the public code does. Deviations from the public code (docs/methods.md,
    "PMMs / RPMMs"): the EM initialisation is a fixed buffer drawn from `--em-seed` (the reference draws it afresh,
    unseeded, and does not save it). The backbone's BatchNorm uses batch statistics in training (`--bn batch`, the
    reference's train mode; its affine parameters frozen, as the reference), computed as the reference does: the
    supports in one backbone pass, then the queries in another (`separate_bn_batches`); `--bn frozen` keeps ImageNet's.

    K-shot ('joint'): one EM over the pixels of all K supports (the reference concatenates them spatially).
    """

    kshot = 'joint'
    Options = PMMsOptions
    backbone_spec = BackboneSpec(taps=('layer2', 'layer3'), dilate=(False, True, True),
                                 trainable=('stem', 'layer1', 'layer2', 'layer3'),
                                 stride_on_conv1=True, ceil_pool=True, dilate_first=True)
    legacy_options = {'geometry': 'torchvision', 'bn': 'frozen'}        # checkpoints written before the options
    train_recipe = {'img_size': 321, 'bsz': 8,                  # the public code's input size, batch and augmentation
                    'augmentation': 'flip-resized-crop'}
    plugin_point = 'prototypes'       # CD-TG fuses text into every EM component (foreground and background)
    default_lr = 3.5e-4
    separate_bn_batches = True        # FPMMs.forward extracts the supports, then the query (batch statistics of each)
    cascade = False                   # RPMMs: the residual cascade

    def __init__(self, backbone: Backbone, options=None):
        super().__init__(backbone, options)
        self.stages = self._stage_components()
        # Fixed EM initialisations, one per stage, drawn once from the option's seed and stored with the weights.
        gen = torch.Generator().manual_seed(self.options.em_seed)
        for k in self.stages:
            self.register_buffer(f'em_init_{k}', em_init(WIDTH, k, gen))
        bn = not self.cascade         # FPMMs normalises where FRPMMs drops out
        # layer5: cat(layer2, layer3) -> 256
        self.fuse = nn.Sequential(_conv(sum(backbone.channels), WIDTH, 3, 2), nn.BatchNorm2d(WIDTH), nn.ReLU())
        # layer55: dense comparison of the query with one prototype (its activation is applied in `_compare`)
        self.compare = _conv(2 * WIDTH, WIDTH, 3, 2)
        self.compare_post = nn.BatchNorm2d(WIDTH) if bn else nn.Dropout2d(0.5)
        # layer56: RPMMs concatenates the probability map here; PMMs passes it to the residual blocks instead
        self.merge = nn.Sequential(_conv(WIDTH + (2 if self.cascade else 0), WIDTH),
                                   *([nn.BatchNorm2d(WIDTH), nn.ReLU()] if bn else [nn.ReLU(), nn.Dropout2d(0.5)]))
        # residule1-3, layer6, layer7, layer9
        self.residual = nn.ModuleList([ResidualBlock(WIDTH + 2), ResidualBlock(WIDTH), ResidualBlock(WIDTH)])
        self.psp = PSPHead(WIDTH)
        self.project = nn.Sequential(_conv(5 * WIDTH, WIDTH, 1),
                                     *([nn.BatchNorm2d(WIDTH), nn.ReLU()] if bn else [nn.ReLU(), nn.Dropout2d(0.5)]))
        self.classifier = _conv(WIDTH, 2, 1)

    @classmethod
    def spec_for(cls, options) -> BackboneSpec:
        spec = dataclasses.replace(cls.backbone_spec, bn=options.bn)
        if options.geometry == 'torchvision':
            return dataclasses.replace(spec, stride_on_conv1=False, ceil_pool=False, dilate_first=False)
        return spec

    def _stage_components(self) -> tuple[int, ...]:
        return (self.options.components,)

    @property
    def feature_channels(self) -> list[int]:
        return [WIDTH]

    @property
    def feature_levels(self) -> list[int]:
        return [0]

    # --- forward ------------------------------------------------------------------------------------------------
    def match(self, record: EpisodeRecord) -> Output:
        # The reference runs layer5 on the supports and on the query separately (BatchNorm batches in training).
        query = self.fuse(torch.cat(record.query_feats, dim=1))
        support = self.fuse(torch.cat(record.support_feats, dim=1))
        fg, bg = self.prototypes(support, record)
        stages = []
        history = query.new_zeros(query.shape[0], 2, *query.shape[-2:])    # RPMMs' first history (Pseudo_mask)
        for mu_f, mu_b in zip(fg, bg):
            prob = probability_map(query, mu_f, mu_b)
            x = self._compare(query, mu_f)
            if self.cascade:
                x, hist = self.merge(torch.cat([x, prob], dim=1)), history
            else:
                x, hist = self.merge(x), prob
            logits = self.segmentation(x, hist)
            history = torch.softmax(logits, dim=1)
            stages.append(logits)
        if self.cascade and record.nshot > 1 and not self.training and self.options.kshot_prediction == 'stages':
            return Output(stage_mean_log_probabilities(stages, record.image_size))
        stages = [self.upsample(logits, record) for logits in stages]
        return Output(stages[-1], {'stages': stages[:-1]} if len(stages) > 1 else {})

    def prototypes(self, support: torch.Tensor, record: EpisodeRecord) -> tuple[list, list]:
        r"""EM prototypes of every stage, [B,k,256] foreground and background, joint over the K shots, passed to the
        plug-in hook in one call (the stages' components concatenated: every component is fused with the same text
        prototype)."""
        b, k = record.batch, record.nshot
        m = resize_mask(record.ctx.support_masks, tuple(support.shape[-2:]), support.dtype)            # [B*K,1,h,w]
        # [B*K,C,h,w] -> [B,C,K*h*w]: one EM over all the pixels of an episode's supports; fg sets, then bg sets
        x = torch.cat([m * support, (1 - m) * support]).reshape(2 * b, k, WIDTH, -1).transpose(1, 2).flatten(2)
        protos = [em_prototypes(x, getattr(self, f'em_init_{c}')) for c in self.stages]
        fg, bg = [p[:b] for p in protos], [p[b:] for p in protos]
        fused_fg, fused_bg = self.hooks.prototypes([torch.cat(fg, dim=1)], [torch.cat(bg, dim=1)], [support],
                                                   record.ctx)
        return list(fused_fg[0].split(self.stages, dim=1)), list(fused_bg[0].split(self.stages, dim=1))

    def _compare(self, query: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
        r"""layer55 on cat(query, component i) for every foreground component, summed (not averaged) over them."""
        pre = dense_comparison(self.compare, query, fg)                       # [B,k,256,h,w]
        if self.cascade:                                                      # ReLU -> Dropout2d, per component
            out = self.compare_post(torch.relu(pre.flatten(0, 1))).view_as(pre)
        else:
            # BatchNorm per component, as the reference calls layer55 once per component (batch statistics in
            # training, running statistics updated once per component)
            out = torch.stack([torch.relu(self.compare_post(pre[:, i])) for i in range(pre.shape[1])], dim=1)
        return out.sum(dim=1)

    def segmentation(self, x: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        r"""The reference's `Segmentation`: residual blocks on cat(x, history), PSP head, 1x1 projections ->
        2-class logits at feature resolution."""
        history = F.interpolate(history, x.shape[-2:], mode='bilinear', align_corners=True)
        x = x + self.residual[0](torch.cat([x, history], dim=1))
        x = x + self.residual[1](x)
        x = x + self.residual[2](x)
        return self.classifier(self.project(self.psp(x)))

    @staticmethod
    def upsample(logits: torch.Tensor, record: EpisodeRecord) -> torch.Tensor:
        r"""Logits to the image size, bilinear without aligned corners (the reference's `F.upsample` default)."""
        return F.interpolate(logits, record.image_size, mode='bilinear', align_corners=False)

    # --- training -----------------------------------------------------------------------------------------------
    def loss(self, output: Output, batch: dict) -> dict[str, torch.Tensor]:
        r"""Cross-entropy of the prediction; RPMMs adds the same loss on its first two stages (the reference sums
        the three with weight 1). Pixels labelled 255 are ignored."""
        terms = {'ce': self.cross_entropy(output.logits, batch['query_mask'])}
        for i, logits in enumerate(output.aux.get('stages', []), start=1):
            terms[f'ce_stage{i}'] = self.cross_entropy(logits, batch['query_mask'])
        return terms

    def configure_optimizers(self, lr: float | None = None, total_steps: int = 1) -> Recipe:
        r"""The reference's SGD (momentum 0.9, weight decay 5e-4 on every group) with four parameter groups: backbone
        weights ×1, backbone biases ×2, other weights ×10, other biases ×20 (a plug-in adds its own group, relative
        to the ×1 base rate); poly LR decay (power 0.9) over `total_steps`, stepped after every optimizer step."""
        lr = lr or self.default_lr
        backbone = {id(p) for p in self.backbone.parameters()}
        host = {id(p) for p in self.host_parameters()}
        groups = {key: [] for key in LR_MULT}
        for name, p in self.named_parameters():
            if id(p) in host:
                kind = 'bias' if name.endswith('bias') else 'weight'
                groups[('backbone_' if id(p) in backbone else '') + kind].append(p)
        param_groups = [{'params': ps, 'lr': lr * LR_MULT[key], 'name': key} for key, ps in groups.items()]
        optimizer = torch.optim.SGD(self.param_groups(param_groups, lr, adaptive=False), lr=lr, momentum=MOMENTUM,
                                    weight_decay=WEIGHT_DECAY)
        return Recipe(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(total_steps)))


class RPMMs(PMMs):
    r"""RPMMs (the reference's networks/FRPMMs.py): three residual stages with k = 1, 3, 6 sharing every weight; the
    probability map is concatenated before the merge layer and each stage's softmax is the next stage's history;
    Dropout2d instead of BatchNorm in the head. Loss: the sum of the three stages' cross-entropies. The prediction:
    the last stage for one shot; for K > 1 at test time the mean of the three stages' probabilities, as the
    reference's 5-shot code (`--kshot-prediction last`: the last stage).
    """

    Options = RPMMsOptions
    legacy_options = {'geometry': 'torchvision', 'bn': 'frozen', 'kshot_prediction': 'last'}   # before the options
    cascade = True
    STAGES = (1, 3, 6)

    def _stage_components(self) -> tuple[int, ...]:
        return self.STAGES

r"""The CD-TG plug-in: semantic-guided unit (text-aligned features and prototypes) and medical-style augmentation.

It subclasses `model.base.Hooks` and is attached to any method with `method.attach(plugin)`; methods never import
this package. A(F) below is the text alignment of a feature map (`TextAlign`), α the image weight (0.7 by default,
as the reference code's `FFAttention(weight_image=0.7, weight_text=0.3)`). Three readings, by host and flag:
  * prototype hosts (PATNet, ...), default = the released code (Lilacis/CD_TG plug-in.py): support features are
    aligned with the class text (S_f) and with the background text (S_b); FP_t = MAP(S_f, m), BP_t = MAP(S_b, 1 - m)
    per support and level, and the host's prototypes become FP <- α·FP + (1-α)·FP_t, BP <- α·BP + (1-α)·BP_t. The
    host matches its own (un-aligned) maps.
  * prototype hosts with `--cdtg-features` = the paper's framework figure (text-aligned query and support maps
    F_q^t, F_s^t go into the FSS method together with the fused prototypes): the query and support maps the host
    sees become α·F + (1-α)·A(F) with the class text. The host then pools its prototypes from those maps, and MAP is
    linear in the map, so its FP is exactly α·MAP(F, m) + (1-α)·MAP(A(F), m), the figure's P_final; no further
    fusion, and no background text (the figure has none).
  * feature hosts (HSNet, no prototypes; this project's extension, HSNet is not one of the paper's hosts): query
    and support taps pass through a residual gate that starts as the identity, F <- F + g·(1-α)·(A(F) - F), g a
    learnable scalar per level, zero at init (α only rescales g here, so test.py refuses --alpha overrides).
During training, support features are perturbed by the medical-style AdaIN (unless disabled). With α = 1 and fixed
fusion the plug-in is an exact identity on the host's outputs (in eval mode); `--fusion gated` makes prototype hosts
start at that identity too.

A(F) = LayerNorm(F + u) keeps the text term u bounded and text-only by default (`TextAlign`, "bounded": no bias
path, the rows of the bound text table less what they share, ||u||/||F|| = s <= 1 at every pixel); the template's
unbounded form stays available. The plug-in trains in its own optimiser group (`optimizer_groups`) and reports its
health to the training loop (`readings`, `check_health`): see docs/cdtg.md, "Training the plug-in", "Health readings".

The alignment modules are sized per level by default (the level's width C: ≈ 24 M parameters for ResNet-50's
512/1024/2048 channels); `--cdtg-width W` aligns every level in one shared W-d space instead (per-level linear maps
C -> W -> C around one `TextAlign(W)`; the reference aligns 512-d features with one 512-d module, ≈ 1.6 M), so that
gains of "+CD-TG" can be told apart from added capacity.
"""
import hashlib
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from model.base import EpisodeContext, Hooks
from model.layers import masked_average_pooling, resized_masks
from text.descriptions import Descriptions, load_description_file, load_descriptions
from text.encoder import ClipTextEncoder, TextBank, identity_mismatch
from text.settings import (GENERIC_BACKGROUND, LR_SCALES, MAX_TEXT_RATIO, TEXT_ENCODERS, TEXT_RATIO,  # noqa: F401
                           CDTGConfig)

TEXT_DIMS = {name: spec.dim for name, spec in TEXT_ENCODERS.items()}
#: MAP(F, m) = Σ F·m / (Σ m + ε): the reference plug-in's `generate_prototype` and PATNet both use 1e-6.
MAP_EPS = 1e-6
#: Health probes read this many supports of a batch.
PROBE_SUPPORTS = 4
#: `check_health` warns when the text prototypes of two classes stay this alike (cosine) for this many steps.
ALIKE_COS, ALIKE_STEPS = 0.99, 100
class TextAlign(nn.Module):
    r"""Aligns a feature map [N,C,h,w] with text, per pixel: LayerNorm_C(F + u), u the text term.

    mode 'paper': the reference design (MLP d->d->d on the text, then MultiheadAttention(d, 8) with the pixels as
        queries and the same text vector repeated at every position as keys and values). With identical keys the
        attention weights are uniform, so the term is one vector per text, u(t) = W_o(W_v·MLP(t) + b_v) + b_o,
        computed here in that closed form (W_q, W_k would receive zero gradient and are not created).
    mode 'attributes': real cross-attention of every pixel over the class's caption and attribute sentences.
    The text embedding is first projected to the level's width C.

    bias 'bounded' (default, our deviation from the template): the text layers have no biases, so the text is the
    only source of u (the template's biases give every class nearly the same u); u keeps only its direction
    û = (u - mean_c u) / rms_c(u - mean_c u), and each pixel p gets u_p = s·σ_p·û with σ_p = sqrt(var_c F_p + ε_LN)
    the scale LayerNorm divides that pixel by, and s = MAX_TEXT_RATIO·sigmoid(θ) learned (initialised at `ratio`).
    So ||u_p|| / ||F_p - mean|| = s <= 1 at every pixel whatever the weights do, and LayerNorm(F + u) can never
    become LayerNorm(u) (the template's u grew to 10^4 x F under Adam). bias 'template': the reference's unbounded
    form, for reproduction.
    """

    def __init__(self, text_dim: int, channels: int, mode: str = 'paper', heads: int = 8, bias: str = 'bounded',
                 ratio: float = TEXT_RATIO):
        super().__init__()
        self.mode, self.bounded = mode, bias == 'bounded'
        with_bias = not self.bounded
        self.proj = nn.Linear(text_dim, channels, bias=with_bias)
        self.mlp = nn.Sequential(nn.Linear(channels, channels, bias=with_bias), nn.ReLU(),
                                 nn.Linear(channels, channels, bias=with_bias))
        if mode == 'paper':
            self.value = nn.Linear(channels, channels, bias=with_bias)
            self.out = nn.Linear(channels, channels, bias=with_bias)
        else:
            self.attn = nn.MultiheadAttention(channels, heads, batch_first=True, bias=with_bias)
        self.norm = nn.LayerNorm(channels)
        if self.bounded:
            if not 0 < ratio < MAX_TEXT_RATIO:
                raise ValueError(f'the initial text ratio must lie in (0, {MAX_TEXT_RATIO}), got {ratio}')
            self.ratio_logit = nn.Parameter(torch.tensor(math.log(ratio / (MAX_TEXT_RATIO - ratio))))

    def ratio(self) -> torch.Tensor:
        r"""s, the bounded text term's share of each pixel's feature scale (in (0, MAX_TEXT_RATIO))."""
        return MAX_TEXT_RATIO * torch.sigmoid(self.ratio_logit)

    def text_bias(self, text: torch.Tensor) -> torch.Tensor:
        r"""The paper mode's text vector [N,D] -> [N,C]: u(t) (template) or its unit direction û(t) (bounded)."""
        u = self.out(self.value(self.mlp(self.proj(text))))
        return _unit_rms(u) if self.bounded else u

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        r"""What `align_tokens` needs of the text [N,T,D]: `text_bias` [N,C] (paper mode, from text[:, 0]) or the keys
        [N,T,C] (attributes mode). It depends on the text only, so the taps of one level (and, in a shared space,
        every level) compute it once: for 2048-d maps it reads ~68 MB of weights, more than aligning a tap costs."""
        if self.mode == 'paper':
            return self.text_bias(text[:, 0])
        return self.mlp(self.proj(text))

    def encode_table(self, table: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r"""`encode_text` of every row of a bound text table [R,T,D] (the classes, then the background; mask [R,T]).
        Bounded: the part common to all rows is removed, so what is left of a row is what tells its text from the
        others' (without this, training turns every class's u towards one shared direction, a learned bias again:
        the cosine between the text prototypes of different classes rose to 1.000 within 50 steps on the synthetic
        pair). Paper mode: û_r = unit(u(t_r) - mean_r u(t_r)) [R,C]; attributes: the keys [R,T,C] less their mean over
        every real sentence (the attention's values then share no common part; its weights do not change, as the
        query-key products all shift by one constant). Template: `encode_text` of each row."""
        if not self.bounded:
            return self.encode_text(table)
        if self.mode == 'paper':
            u = self.out(self.value(self.mlp(self.proj(table[:, 0]))))
            return _unit_rms(u - u.mean(dim=0, keepdim=True))
        keys = self.mlp(self.proj(table))
        real = mask.unsqueeze(-1).to(keys.dtype)
        return keys - (keys * real).sum(dim=(0, 1)) / real.sum()

    def text_term(self, x: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        r"""u, what the text adds to the pixels x [N,L,C] before the LayerNorm: [N,1,C] (template paper mode, one
        vector) or [N,L,C]. `encoded` = `encode_text(text)`, mask [N,T] (True = real sentence)."""
        if self.mode == 'paper':
            term = encoded.unsqueeze(1)
        else:
            pad = None if mask is None else ~mask
            term = self.attn(x, encoded, encoded, key_padding_mask=pad, need_weights=False)[0]
            term = _unit_rms(term) if self.bounded else term
        if self.bounded:
            term = term * (self.ratio() * _pixel_scale(x, self.norm.eps))            # s·σ_p·û
        return term

    def align_tokens(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None,
                     encoded: torch.Tensor | None = None) -> torch.Tensor:
        r"""x [N,L,C] (pixels as tokens); text [N,T,D] with mask [N,T] (True = real sentence) -> [N,L,C].
        `encoded`: `encode_text(text)` if the caller already has it."""
        encoded = self.encode_text(text) if encoded is None else encoded
        return self.norm(x + self.text_term(x, encoded, mask))

    def text_ratio(self, x: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        r"""||u|| / ||F|| over the pixels x [N,L,C] as LayerNorm sees them: sqrt(Σ_p ||u_p - mean_c u_p||²) /
        sqrt(Σ_p C (var_c x_p + ε_LN)) (the mean over the channels is what LayerNorm removes). The bounded term gives
        exactly s; the template's grows without limit when training drives it (a health reading)."""
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            x = x.to(dtype)
            term = self.text_term(x, encoded.to(dtype), mask).to(dtype)
            term = term - term.mean(dim=-1, keepdim=True)
            num = term.pow(2).sum(dim=-1).expand(x.shape[:2]).sum()
            den = (x.var(dim=-1, correction=0) + self.norm.eps).sum() * x.shape[-1]
        return float((num / den).sqrt())

    def forward(self, feat: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None,
                encoded: torch.Tensor | None = None) -> torch.Tensor:
        r"""feat [N,C,h,w]; text [N,T,D] with mask [N,T]. paper mode uses text[:, 0]."""
        n, c, h, w = feat.shape
        x = self.align_tokens(feat.flatten(2).transpose(1, 2), text, mask, encoded)   # [N,C,h,w] -> [N,hw,C]
        return x.transpose(1, 2).reshape(n, c, h, w)                                   # [N,hw,C] -> [N,C,h,w]

    def pooled(self, feat: torch.Tensor, texts: list[torch.Tensor], weights: list[torch.Tensor],
               eps: float, encoded: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        r"""MAP(A(F, t_i), w_i) = Σ_p w_p A(F,t)_p / (Σ_p w_p + eps) for the paper mode, without forming A(F).

        The term is u_p = k_p·v with one vector v per text: k_p = 1, v = u (template) or k_p = s·σ_p, v = û
        (bounded). With x_p = F_p + k_p v, LayerNorm's per-pixel moments follow from F's and v's:
        μ_p = mean_c F_p + k_p v̄, σ²_p = var_c F_p + k_p² var v + 2 k_p cov_c(F_p, v); then with
        a_p = w_p / sqrt(σ²_p + ε_LN)
            Σ_p w_p LN(x_p) = γ ⊙ (Σ_p a_p F_p + v Σ_p a_p k_p − Σ_p a_p μ_p) + β Σ_p w_p.
        F is only read, four times whatever the number of texts T: two moment reductions, one product for the T
        covariances and one for the T poolings (instead of building, transposing and normalising a full [N,hw,C] map
        per text).
        feat [N,C,h,w]; texts T x [N,T',D] (caption first); weights T x [N,h,w] at the feature size; `encoded`: the
        texts' `encode_text` if the caller has them. Float32 at least (a sum over thousands of pixels).
        """
        with torch.autocast(feat.device.type, enabled=False):
            f = feat.flatten(2)
            f = f if f.dtype in (torch.float32, torch.float64) else f.float()               # [N,C,L]
            var_f, mean_f = _pixel_moments(f)                                               # [N,1,L]
            if encoded is None:
                encoded = [self.text_bias(text[:, 0]) for text in texts]
            v = torch.stack([e.to(f.dtype) for e in encoded], dim=1)                         # [N,T,C]
            w = torch.stack([x.flatten(1).to(f.dtype) for x in weights], dim=1)              # [N,T,L]
            v_mean = v.mean(dim=2, keepdim=True)                                             # [N,T,1]
            v_c = v - v_mean
            cov = torch.bmm(v_c, f).div_(f.shape[1])                                         # [N,T,L]
            var_v = v_c.pow(2).mean(dim=2, keepdim=True)                                     # [N,T,1]
            if self.bounded:
                k = (var_f + self.norm.eps).sqrt() * self.ratio().to(f.dtype)                # [N,1,L]
                var = cov * (2 * k) + var_f + (k * k) * var_v                                 # out of place: k learns
            else:
                k = None
                var = cov.mul_(2).add_(var_f).add_(var_v)
            a = w * var.clamp_min_(0).add_(self.norm.eps).rsqrt_()
            ak = a if k is None else a * k
            total = w.sum(dim=2, keepdim=True)                                               # [N,T,1]
            num = (torch.bmm(a, f.transpose(1, 2)) + v * ak.sum(dim=2, keepdim=True)
                   - (a * mean_f + ak * v_mean).sum(dim=2, keepdim=True))                   # [N,T,C]
            out = (self.norm.weight.to(f.dtype) * num + self.norm.bias.to(f.dtype) * total) / (total + eps)
        return list(out.unbind(dim=1))


def _unit_rms(u: torch.Tensor) -> torch.Tensor:
    r"""u centred and scaled to unit root-mean-square over its last (channel) dimension: a direction that carries no
    scale of its own (zero where u is constant)."""
    return F.layer_norm(u, u.shape[-1:], eps=1e-12)


def _pixel_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    r"""σ_p = sqrt(var_c x_p + eps) of every pixel of x [N,L,C] -> [N,L,1], in float32 at least: the scale
    LayerNorm divides the pixel by."""
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return (x.var(dim=-1, correction=0, keepdim=True) + eps).sqrt()


def _pixel_moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Biased variance and mean [N,1,L] over the channels of every pixel of f [N,C,L].

    Without autograd: var = E[f²] - mean², from two read-only reductions along the channels (contiguous in the
    backbone's channels-last maps: ~10x faster on CPU than torch.var_mean or LayerNorm's moment kernel, which writes a
    normalised copy). Its rounding error, about ε·E[f²]/var, is that of var_mean for backbone taps (ReLU maps:
    E[f²]/var = 1.0-1.3 per pixel at every ResNet-50 tap); a constant pixel gives var ≈ 0 (clamped at 0). With
    autograd (a host training the layers below its prototypes) it is torch.var_mean.
    """
    if f.requires_grad and torch.is_grad_enabled():
        return torch.var_mean(f, dim=1, correction=0, keepdim=True)
    mean = f.mean(dim=1, keepdim=True)
    square = torch.linalg.vector_norm(f, dim=1, keepdim=True).square_().div_(f.shape[1])
    return square.sub_(mean * mean).clamp_min_(0), mean


class LevelProjection(nn.Module):
    r"""One level's way into and out of a shared W-d alignment space: A(F) = U(TextAlign_W(D F)) per pixel, with
    D: C -> W and U: W -> C linear (both the identity when C = W)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.down = nn.Linear(channels, width) if channels != width else nn.Identity()
        self.up = nn.Linear(width, channels) if channels != width else nn.Identity()

    def forward(self, feat: torch.Tensor, shared: TextAlign, text: torch.Tensor,
                mask: torch.Tensor | None = None, encoded: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = feat.shape
        x = self.up(shared.align_tokens(self.down(feat.flatten(2).transpose(1, 2)), text, mask, encoded))  # [N,hw,C]
        return x.transpose(1, 2).reshape(n, c, h, w)


class MedicalStyle(nn.Module):
    r"""Medical-style AdaIN on support features (training only), as the CD-TG reference.

    One transform is drawn per call (shared by all taps of the batch) to build a style map: noise F + N(0, s²);
    contrast ReLU((1+s)·F); boundary F + s·DWConv3x3(F) with a fresh, random, untrained depthwise kernel
    (U(-1/3, 1/3), PyTorch's default init, no bias); low contrast μ + s·(F - μ). Then standard AdaIN: normalise the
    content per sample and channel and rescale it with the style's std and mean (unbiased std, eps on the std).
    """
    KINDS = ('noise', 'contrast', 'boundary', 'low_contrast')

    def __init__(self, strength: float = 0.3, eps: float = 1e-5):
        super().__init__()
        self.strength, self.eps = strength, eps

    def style(self, feat: torch.Tensor, kind: str) -> torch.Tensor:
        s = self.strength
        if kind == 'noise':
            return feat + s * torch.randn_like(feat)
        if kind == 'contrast':
            return F.relu((1 + s) * feat)
        if kind == 'boundary':
            c = feat.shape[1]
            kernel = (torch.rand(c, 1, 3, 3, device=feat.device, dtype=feat.dtype) * 2 - 1) / 3
            return feat + s * F.conv2d(feat, kernel, padding=1, groups=c)
        mean = feat.mean(dim=(2, 3), keepdim=True)
        return mean + s * (feat - mean)

    def adain(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        r"""Unbiased std over the map; a 1x1 map (a 32x32 input at stride 32) has no spread: std 0, so the result is
        the style's mean instead of the unbiased estimate's 0/0."""
        correction = 1 if content.shape[2] * content.shape[3] > 1 else 0
        c_mean = content.mean(dim=(2, 3), keepdim=True)
        c_std = content.std(dim=(2, 3), keepdim=True, correction=correction)
        s_mean = style.mean(dim=(2, 3), keepdim=True)
        s_std = style.std(dim=(2, 3), keepdim=True, correction=correction)
        return (content - c_mean) / (c_std + self.eps) * s_std + s_mean

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.training:
            return feats
        kind = self.KINDS[int(torch.randint(len(self.KINDS), ()))]
        return [self.adain(f, self.style(f, kind)) for f in feats]


class CDTG(Hooks):
    r"""The CD-TG plug-in for one host method.

    Args:
        feature_channels: width of each feature tap the host exposes to hooks.
        feature_levels: level id of each tap (taps of one level share an alignment module; HSNet family: stage).
        plugin_point: 'prototypes' or 'features' (see the module docstring).
        config: a `CDTGConfig`.
    Call `bind(benchmark, class_names)` before running episodes of a benchmark: it looks up the class and background
    descriptions (text/descriptions/<benchmark>.yaml, or the `--descriptions` file for the benchmark it declares) and
    their embeddings (cached on disk when the encoder is frozen).
    """

    def __init__(self, feature_channels: list[int], feature_levels: list[int], plugin_point: str,
                 config: CDTGConfig):
        super().__init__()
        if plugin_point not in ('prototypes', 'features'):
            raise ValueError(f'unknown plug-in point {plugin_point!r}')
        self.config = config.validate()
        self.point = plugin_point
        if config.maps and plugin_point != 'prototypes':
            raise UserError('--cdtg-features feeds text-aligned maps to a prototype host; this method has no '
                            'prototypes and its CD-TG already acts on its features (drop --cdtg-features)')
        if config.background != 'domain' and (plugin_point != 'prototypes' or config.maps):
            raise UserError('--cdtg-background chooses the caption of the background prototype, which only the '
                            'prototype fusion without --cdtg-features uses')
        if config.fusion == 'gated' and plugin_point == 'features':
            raise UserError('--fusion gated: on this method the plug-in is already a gated residual that starts as '
                            'the identity (F + g(1-alpha)(A(F) - F), g = 0 at start); use --fusion fixed')
        levels = sorted(set(feature_levels))
        self.tap_level = [levels.index(lv) for lv in feature_levels]
        widths = [feature_channels[feature_levels.index(lv)] for lv in levels]
        if config.text_lora > 0:
            self.text_encoder = ClipTextEncoder(config.clip, config.clip_weights, config.text_lora, config.seed)
            self.bank = None
            text_dim = self.text_encoder.dim
        else:
            self.text_encoder = None
            self.bank = TextBank(config.clip, config.clip_weights, config.text_cache, config.seed)
            text_dim = TEXT_DIMS[config.clip]
        source = self.text_encoder if self.text_encoder is not None else self.bank
        self.identity, self.encoder_record = source.identity, source.record
        align = dict(mode=config.attn, bias=config.text_bias, ratio=config.text_ratio)
        if config.width is None:
            self.align = nn.ModuleList([TextAlign(text_dim, c, **align) for c in widths])
            self.shared_align = None
        else:
            self.align = nn.ModuleList([LevelProjection(c, config.width) for c in widths])
            self.shared_align = TextAlign(text_dim, config.width, **align)
        if config.fusion == 'learned':
            logit = math.log(config.alpha / (1 - config.alpha))
            self.alpha_logit = nn.Parameter(torch.full((len(levels),), logit))
        # the identity start: feature hosts always, prototype hosts with --fusion gated
        self.gate = nn.Parameter(torch.zeros(len(levels))) if plugin_point == 'features' or \
            config.fusion == 'gated' else None
        self.style = MedicalStyle(config.style_strength) if config.style_aug else None
        # a --descriptions file is read (and validated) now; it serves the benchmark it declares
        self.file_descriptions = load_description_file(config.descriptions) if config.descriptions else None
        self.benchmark: str | None = None
        self.class_names: list[str] = []
        self.texts_used: dict[str, dict] = {}
        self._from_file: tuple[str, list[str]] | None = None      # what `bind` bound from a description file
        self._encodings: dict[int, tuple] = {}                      # `_table_encoding`'s reusable results
        self._group: dict = {}                                       # what `optimizer_groups` built
        self._probed: dict[int, dict] = {}                          # this probe's readings per level
        self._alike_since: int | None = None                        # first step of a run of indistinguishable texts
        self._alike_warned: int | None = None                       # the run already warned about

    # --- text -------------------------------------------------------------------------------------------------
    def descriptions_for(self, benchmark: str) -> Descriptions:
        r"""The `--descriptions` file when it describes `benchmark`, else the shipped text/descriptions file. The
        first benchmark a plug-in serves (training: the source benchmark; test: the tested one) must be the file's."""
        given = self.file_descriptions
        if given is not None and given.benchmark == benchmark:
            return given
        if given is not None and not self.texts_used:
            raise UserError(f'--descriptions {given.path} describes benchmark {given.benchmark!r}, but this run '
                            f'uses it for {benchmark!r}; pass a file written for {benchmark!r} (its `benchmark:` '
                            'field), or leave --descriptions out to use the shipped descriptions')
        return load_descriptions(benchmark)

    def bind(self, benchmark: str, class_names: list[str]) -> None:
        r"""Look up (and embed, unless cached) the descriptions of `class_names` and the domain's background."""
        if self._from_file == (benchmark, list(class_names)):
            return
        desc = self.descriptions_for(benchmark)
        attributes = self.config.attn == 'attributes'
        entries = desc.for_classes(class_names)
        if attributes and any(not c.attributes for c in entries):
            raise UserError(f'{desc.path} holds captions only (no attribute sentences); --cdtg-attn attributes needs '
                            'them: use --cdtg-attn paper with this file')
        per_class = [list(c.texts) if attributes else [c.caption] for c in entries]
        if self.config.background == 'generic':
            background = [GENERIC_BACKGROUND]
        else:
            background = [desc.background_caption] + (list(desc.background_attributes) if attributes else [])
        record = {'file': str(desc.path), 'sha256': hashlib.sha256(Path(desc.path).read_bytes()).hexdigest(),
                  'source': '--descriptions' if desc is self.file_descriptions else 'shipped',
                  'author': desc.provenance.get('author'), 'model': desc.provenance.get('model')}
        self.bind_texts(benchmark, list(class_names), per_class, background, record)
        self._from_file = (benchmark, list(class_names))

    def bind_texts(self, key: str, class_names: list[str], class_texts: list[list[str]],
                   background_texts: list[str], record: dict | None = None) -> None:
        r"""Bind arbitrary texts: class i (class_id i) is described by `class_texts[i]` (a caption, then optional
        attribute sentences), the background by `background_texts`. The 'paper' attention reads each caption only,
        'attributes' every sentence. `key` names this set of texts (e.g. a benchmark); `bind` uses this with the
        description files, predict.py with a one-off description typed by the user. Texts are embedded (frozen
        encoder: through the on-disk cache) or tokenised (LoRA: encoded in the graph at every episode). `record`: what
        `texts_used` (results.json, checkpoints) keeps about them; default: the typed texts and their SHA-256."""
        if len(class_names) != len(class_texts) or not class_texts:
            raise ValueError(f'bind_texts needs one text list per class (got {len(class_names)} names, '
                             f'{len(class_texts)} text lists)')
        groups = [list(g) for g in class_texts] + [list(background_texts)]
        if any(not g or any(not isinstance(t, str) or not t.strip() for t in g) for g in groups):
            raise UserError('every class and the background need at least one non-empty description text')
        if self.config.attn != 'attributes':
            groups = [g[:1] for g in groups]
        t_max = max(len(g) for g in groups)
        mask = torch.zeros(len(groups), t_max, dtype=torch.bool)
        for i, g in enumerate(groups):
            mask[i, :len(g)] = True
        device = next(self.align.parameters()).device
        labels = [name for name, g in zip(list(class_names) + ['background'], groups) for _ in g]
        if self.bank is not None:
            flat = self.bank.embed([t for g in groups for t in g], labels)
            table = torch.zeros(len(groups), t_max, flat.shape[-1])
            table[mask] = flat
        else:
            tokens = self.text_encoder.tokenize([t for g in groups for t in g], labels)
            table = torch.zeros(len(groups), t_max, tokens.shape[-1], dtype=tokens.dtype)
            table[mask] = tokens
        if record is None:
            typed = '\n'.join(t for g in groups for t in g).encode()
            record = {'file': None, 'sha256': hashlib.sha256(typed).hexdigest(), 'source': 'typed', 'texts': groups}
        table, mask, control = self._text_control(key, list(class_names), table, mask)
        self.register_buffer('text_table' if self.bank is not None else 'token_table', table.to(device),
                             persistent=False)
        self.register_buffer('text_mask', mask.to(device), persistent=False)
        self.benchmark, self.class_names = key, list(class_names)
        self.texts_used[key] = dict(record, **control)
        self._from_file = None                   # `bind` sets it after this call, a direct call leaves it unset
        self._encodings = {}

    def _text_control(self, key: str, class_names: list[str], table: torch.Tensor,
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        r"""`--cdtg-text`: the bound table (rows: classes, then background) as the descriptions give it, or a control:
        'random' replaces every embedding by a random unit vector (CLIP's embeddings are unit vectors too), 'shuffled'
        describes class i by the text of class π(i), π a derangement (no class keeps its own text; the background
        keeps its own). Both are drawn from a generator seeded by (--seed, key), so training and every test of a run
        use the same control. Returns the table, its mask and what results.json records about the control."""
        source = self.config.text
        if source == 'descriptions':
            return table, mask, {}
        digest = hashlib.sha256(f'{self.config.seed}:{key}:{source}'.encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], 'little') >> 1)
        if source == 'random':
            noise = torch.randn(table.shape, generator=gen, dtype=torch.float64)
            table = (noise / noise.norm(dim=-1, keepdim=True)).to(table.dtype) * mask[..., None]
            return table, mask, {'text': 'random', 'note': 'random unit vectors instead of the text embeddings'}
        n = len(class_names)
        if n < 2:
            raise UserError(f'--cdtg-text shuffled describes each class by another class\'s text, but {key} has '
                            f'{n} class ({", ".join(class_names)}); use --cdtg-text descriptions or random here')
        while True:
            perm = torch.randperm(n, generator=gen)
            if not bool((perm == torch.arange(n)).any()):
                break
        rows = torch.cat([perm, torch.arange(n, table.shape[0])])
        return table[rows], mask[rows], {'text': 'shuffled',
                                         'described_by': {class_names[i]: class_names[int(perm[i])]
                                                          for i in range(n)}}

    def _apply(self, fn, *args, **kwargs):
        self._encodings = {}                     # .to(), .double(), ...: the parameters may be new tensors
        return super()._apply(fn, *args, **kwargs)

    def _texts(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Embeddings [N,T,D] and mask [N,T] of the given rows of the bound table (last row = background)."""
        return self._embedded_table()[rows], self.text_mask[rows]

    def _embedded_table(self) -> torch.Tensor:
        r"""The text embeddings of the whole bound table [R,T,D] (classes, then the background; T sentences per row,
        `text_mask` says which are real): frozen and cached (`text_table`), or, with LoRA, encoded in the graph."""
        if self.benchmark is None:
            raise RuntimeError('CDTG.bind(benchmark, class_names) must be called before running episodes')
        if self.bank is not None:
            return self.text_table
        m = self.text_mask
        emb = self.text_encoder(self.token_table[m])                       # [n_sentences, D]
        table = emb.new_zeros(*m.shape, emb.shape[-1])
        table[m] = emb
        return table

    def class_texts(self, class_id: torch.Tensor):
        return self._texts(class_id.long())

    # --- alignment and fusion ---------------------------------------------------------------------------------
    def aligned(self, level: int, feat: torch.Tensor, text: torch.Tensor | None, mask: torch.Tensor,
                encoded: torch.Tensor | None = None) -> torch.Tensor:
        r"""A(F) of one level: [N,C,h,w] -> [N,C,h,w] (per-level module, or the shared W-d space). `encoded`: the
        rows' encoding (`_encoder_cache`), which the taps of a level share; then `text` is not read."""
        if self.shared_align is None:
            return self.align[level](feat, text, mask, encoded)
        return self.align[level](feat, self.shared_align, text, mask, encoded)

    def _text_layers(self, level: int) -> tuple[int, TextAlign]:
        r"""The `TextAlign` that encodes texts for `level`, and a key naming it (-1: the shared W-d space, which
        serves every level)."""
        return (level, self.align[level]) if self.shared_align is None else (-1, self.shared_align)

    def image_weight(self, level: int):
        r"""α of `level`: fixed, or a learned sigmoid (--fusion learned)."""
        if self.config.fusion == 'learned':
            return torch.sigmoid(self.alpha_logit[level])
        return self.config.alpha

    def text_weight(self, level: int):
        r"""w in X' = X + w·(T - X), the text's share of a fused prototype (T = FP_t) or map (T = A(F)): 1 - α, times
        the gate g where there is one (feature hosts; --fusion gated), which is 0 at the start of training."""
        w = 1 - self.image_weight(level)
        return w if self.gate is None else self.gate[level] * w

    # --- hooks ------------------------------------------------------------------------------------------------
    def support_features(self, feats: list[torch.Tensor], ctx: EpisodeContext) -> list[torch.Tensor]:
        if self.style is not None:
            feats = self.style(feats)                                      # identity in eval mode
        if self.point == 'features' or self.config.maps:
            feats = self._mixed(feats, ctx.class_id.repeat_interleave(ctx.nshot), ctx.support_masks)
        return feats

    def query_features(self, feats: list[torch.Tensor], ctx: EpisodeContext) -> list[torch.Tensor]:
        if self.point == 'features' or self.config.maps:
            feats = self._mixed(feats, ctx.class_id)
        return feats

    def _mixed(self, feats: list[torch.Tensor], class_id: torch.Tensor,
               support_masks: torch.Tensor | None = None) -> list[torch.Tensor]:
        r"""Maps moved towards their class-text alignment: F + w·(A(F) - F), w = `text_weight` (g·(1-α) on feature
        hosts; 1-α, i.e. α·F + (1-α)·A(F), on prototype hosts with --cdtg-features). `support_masks`: given for
        supports, which a training probe reads."""
        rows = class_id.long()
        mask = self.text_mask[rows]
        encoded = self._encoder_cache()
        masks = resized_masks(support_masks, feats) if self.probing and support_masks is not None else None
        out = []
        for i, f in enumerate(feats):
            level = self.tap_level[i]
            out.append(_lerp(f, self.aligned(level, f, None, mask, encoded(level, rows)), self.text_weight(level)))
            if masks is not None and level not in self._probed:
                m = masks[tuple(f.shape[-2:])]
                with torch.no_grad():                             # FP and FP' pooled from the map before and after
                    host, fused = (masked_average_pooling(x.float(), m, eps=MAP_EPS)[:, None] for x in (f, out[-1]))
                self._probe(level, f, m, rows, host, fused, encoded)
        return out

    def _encoder_cache(self) -> Callable[[int, torch.Tensor], torch.Tensor]:
        r"""The text encodings of one hook call: `encoded(level, rows)` = rows `rows` of `_table_encoding(level)`.
        The taps of a level (every level, in a shared space) share one table encoding: for 2048-d maps the text
        layers read more weights than aligning a tap costs. With frozen text embeddings it is also kept across calls
        while nothing it depends on changes; with LoRA the table is embedded in the graph once per call."""
        cache: dict = {}

        def encoded(level: int, rows: torch.Tensor) -> torch.Tensor:
            key = self._text_layers(level)[0]
            if key not in cache:
                if self.bank is None and 'table' not in cache:
                    cache['table'] = self._embedded_table()
                cache[key] = self._table_encoding(level, cache.get('table'))
            return cache[key][rows]
        return encoded

    def _table_encoding(self, level: int, embedded: torch.Tensor | None = None) -> torch.Tensor:
        r"""`TextAlign.encode_table` of the whole bound table for `level`'s alignment (bounded: each row's direction
        after the part common to all rows is removed). With frozen embeddings and without autograd it is computed
        once and reused until the table is rebound (`bind_texts`), the module is converted or moved (`_apply`), a
        parameter of the alignment changes in place (an optimizer step, load_state_dict: each bumps the tensor's
        version) or the autocast state differs; under autograd (or with LoRA, from `embedded`) it is computed in
        the graph at every call."""
        key, module = self._text_layers(level)
        if self.bank is None:
            return module.encode_table(self._embedded_table() if embedded is None else embedded, self.text_mask)
        params = list(module.parameters())
        device = self.text_table.device.type
        stamp = (tuple((p.data_ptr(), p._version, p.dtype) for p in params),
                 torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        cached = self._encodings.get(key)
        if not grad and cached is not None and cached[0] == stamp:
            return cached[1]
        table = module.encode_table(self.text_table, self.text_mask)
        if not grad:
            self._encodings[key] = (stamp, table)
        return table

    def prototypes(self, fg: list[torch.Tensor], bg: list[torch.Tensor | None], feats: list[torch.Tensor],
                   ctx: EpisodeContext) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        r"""Fuse text-guided prototypes into the host's prototype sets.

        Per level: FP_t = MAP(A(F_s, class text), m), BP_t = MAP(A(F_s, background text), 1 - m) per support
        [B*K,C]; averaged over the K shots when the host's sets are per episode (N = B); then every prototype of a
        set is fused with its text prototype: FP_p <- FP_p + w (FP_t - FP_p) for p = 1..P, w = `text_weight` (1 - α:
        FP_p <- α FP_p + (1 - α) FP_t; PMMs' mixture components each move towards the same text prototype), and
        likewise BP_p with BP_t. A host without background prototypes (bg None) keeps None. With --cdtg-features the
        host pooled its prototypes from the aligned maps, which already makes them the fused ones (see the module
        docstring): nothing changes here.
        """
        if self.point != 'prototypes' or self.config.maps:
            return fg, bg
        n = feats[0].shape[0]
        k = ctx.nshot
        cls_rows = ctx.class_id.long().repeat_interleave(k)                            # per support
        bg_rows = torch.full((n,), len(self.class_names), dtype=torch.long, device=feats[0].device)
        text_masks = [self.text_mask[cls_rows], self.text_mask[bg_rows]]
        encoded = self._encoder_cache()
        masks = resized_masks(ctx.support_masks, feats)       # the support masks at each tap size, resized once
        new_fg, new_bg = [], []
        for i, f in enumerate(feats):
            level = self.tap_level[i]
            w = self.text_weight(level)
            m = masks[tuple(f.shape[-2:])]
            use_bg = bg[i] is not None
            weights = [m, 1 - m] if use_bg else [m]
            us = [encoded(level, rows) for rows in (cls_rows, bg_rows)[:len(weights)]]
            pooled = self.pooled_texts(level, f, text_masks, weights, us)              # FP_t (, BP_t) [B*K,C]
            new_fg.append(_lerp(fg[i], _per_set(pooled[0], fg[i], k), w))
            new_bg.append(_lerp(bg[i], _per_set(pooled[1], bg[i], k), w) if use_bg else None)
            if self.probing and level not in self._probed:
                self._probe(level, f, m, cls_rows, fg[i], new_fg[-1], encoded)
        return new_fg, new_bg

    def pooled_texts(self, level: int, feat: torch.Tensor, masks: list[torch.Tensor], weights: list[torch.Tensor],
                     encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        r"""[MAP(A(F, t_i), w_i) for each text i] [N,C] each: texts given by their encodings (`_encoder_cache`) and
        sentence masks [N,T], weights [N,1,h,w] at the map's size; in closed form (`TextAlign.pooled`) for the paper
        attention of a per-level module, else by aligning the map once per text."""
        if self.config.attn == 'paper' and self.shared_align is None:
            return self.align[level].pooled(feat, None, weights, MAP_EPS, encoded)
        return [masked_average_pooling(self.aligned(level, feat, None, mask, u), w, eps=MAP_EPS)
                for mask, w, u in zip(masks, weights, encoded)]

    # --- health: what a training probe reads (train.py logs it every --log-every steps) -------------------------
    def _probe(self, level: int, feat: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, host: torch.Tensor,
               fused: torch.Tensor, encoded: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        r"""Readings of one level (no gradient; nothing the training sees is changed): ||u|| / ||F|| on the first
        `PROBE_SUPPORTS` supports, for their own class text; on the first `PROBE_SUPPORTS` supports whose mask has
        foreground and background at this map size, the text prototypes of every bound class (how alike different
        classes' text makes them) and cos(FP_t, BP_t) of their own class; cos(FP, FP') of the host's prototypes
        before and after the plug-in (host, fused [N,P,C], N = supports or episodes; empty prototypes left out)."""
        with torch.no_grad(), torch.autocast(feat.device.type, enabled=False):
            reading = {'fp_fused_cos': _mean_cos(host.float(), fused.float()),
                       'text_weight': float(torch.as_tensor(self.text_weight(level)).detach())}
            area = mask.flatten(1).sum(dim=1)
            seen = ((area > 0) & (area < mask[0].numel())).nonzero().flatten()[:PROBE_SUPPORTS]
            if len(seen):         # supports with foreground and background at this map size (layer4 at 3x3: often not)
                f, m, own = feat[seen].float(), mask[seen].float(), rows[seen]
                n, n_cls = len(seen), len(self.class_names)
                every = [torch.full((n,), r, dtype=torch.long, device=f.device) for r in range(n_cls + 1)]
                pooled = self.pooled_texts(level, f, [self.text_mask[r] for r in every], [m] * n_cls + [1 - m],
                                           [encoded(level, r).float() for r in every])
                tp = F.normalize(torch.stack(pooled[:n_cls], dim=1), dim=-1)            # [n,R,C]
                mine = tp[torch.arange(n, device=f.device), own]                          # own class text
                reading['tp_bp_cos'] = float((mine * F.normalize(pooled[n_cls], dim=-1)).sum(dim=-1).mean())
                if n_cls > 1:
                    cos = (tp @ tp.transpose(1, 2))[:, ~torch.eye(n_cls, dtype=torch.bool, device=f.device)]
                    reading['text_proto_cos_max'] = float(cos.amax(dim=1).mean())
                    reading['text_proto_cos_mean'] = float(cos.mean())
            tokens = feat[:PROBE_SUPPORTS].float().flatten(2).transpose(1, 2)           # [n,L,C]
            if self.shared_align is not None:
                tokens = self.align[level].down(tokens)
            own = rows[:PROBE_SUPPORTS]
            reading['u_over_f'] = self._text_layers(level)[1].text_ratio(tokens, encoded(level, own),
                                                                          self.text_mask[own])
        self._probed[level] = reading

    def readings(self) -> dict:
        r"""The last probe's health readings (docs/cdtg.md, "Health readings"): per level `u_over_f`, `tp_bp_cos`,
        `fp_fused_cos`, `text_proto_cos_mean`, `text_weight` (lists, None for a level the probe did not reach), and
        `text_proto_cos`, the largest cosine between the text prototypes of two different classes (over the levels;
        per level it is the largest over the class pairs, averaged over the probed supports). Clears them."""
        probed, self._probed = self._probed, {}
        if not probed:
            return {}
        levels = range(len(self.align))
        out = {key: [probed.get(lv, {}).get(key) for lv in levels]
               for key in ('u_over_f', 'text_proto_cos_mean', 'tp_bp_cos', 'fp_fused_cos', 'text_weight')}
        largest = [r['text_proto_cos_max'] for r in probed.values() if 'text_proto_cos_max' in r]
        out['text_proto_cos'] = max(largest) if largest else None
        return out

    def check_health(self, readings: dict, step: int) -> list[str]:
        r"""A warning once the text prototypes of different classes have been indistinguishable (cos above
        `ALIKE_COS`) in every reading for `ALIKE_STEPS` steps: the text no longer tells classes apart."""
        cos = readings.get('text_proto_cos')
        if cos is None or cos <= ALIKE_COS:
            self._alike_since = None
            return []
        if self._alike_since is None:
            self._alike_since = step
        if step - self._alike_since < ALIKE_STEPS or self._alike_warned == self._alike_since:
            return []
        self._alike_warned = self._alike_since
        return [f'CD-TG: the text prototypes of different classes have been indistinguishable since step '
                f'{self._alike_since} (largest cosine {cos:.4f} > {ALIKE_COS}): the text no longer guides the '
                'prototypes (see docs/cdtg.md, "Health readings")']

    # --- what a result records ----------------------------------------------------------------------------------
    def reading(self) -> dict:
        r"""Which of the reference's readings this plug-in implements (results.json, checkpoints)."""
        if self.point == 'features':
            maps = 'gated: taps F + g(1-alpha)(A(F) - F), g learned from 0 (project extension for HSNet, not a host ' \
                   'of the paper)'
        elif self.config.maps:
            maps = 'figure: the host matches alpha F + (1-alpha) A(F) and pools its prototypes from them'
        else:
            maps = 'code: the host matches its own maps; text prototypes fused into its prototypes'
        uses_background = self.point == 'prototypes' and not self.config.maps
        if self.config.text_bias == 'bounded':
            bias = ('bounded (ours): LayerNorm(F + s sigma_F u/rms(u)), bias-free text layers, learned s <= '
                    f'{MAX_TEXT_RATIO:g} (initially {self.config.text_ratio:g})')
        else:
            bias = 'template: LayerNorm(F + u(t)), u unbounded, with biases (the reference)'
        fusion = {'fixed': '', 'learned': ', learned per level',
                  'gated': ', gated: FP + g(1-alpha)(FP_t - FP), g learned from 0 (identity start)'}
        return {'maps': maps,
                'alpha': 'image weight (reference code: FFAttention weight_image 0.7, weight_text 0.3)'
                         + fusion[self.config.fusion],
                'text_bias': bias,
                'text': {'descriptions': 'the class descriptions',
                         'random': 'control: random unit vectors instead of the text embeddings',
                         'shuffled': 'control: each class described by another class\'s text'}[self.config.text],
                'width': 'per level' if self.config.width is None else f'shared {self.config.width}-d',
                'background': self.config.background if uses_background else 'not used',
                'map_eps': MAP_EPS}

    # --- training: the plug-in's own optimiser group -------------------------------------------------------------
    def optimizer_groups(self, host_lr: float, adaptive: bool) -> list[dict]:
        r"""The plug-in's parameters as one optimiser group of its own, added to the host's optimizer (Adam or SGD,
        one group or several) by the host's recipe: learning rate `lr_scale` x the host's base rate (default by the
        host's optimizer, `adaptive` = Adam: LR_SCALES; the host's scheduler scales it like every group), decoupled
        weight decay (Adam: AdamW's p <- p - lr·wd·p; SGD, which has no adaptive step to decouple from, applies
        `weight_decay` its own way) and `max_grad_norm`, its own gradient clip (engine/loops.py applies it before the
        host's); on Adam hosts the group is stepped by torch's fused kernel where the device has one. In the host's
        Adam group its ~168x smaller gradients were normalised into full-size steps and its text bias grew 10^4-fold
        in 80 steps (docs/cdtg.md, "Training the plug-in")."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        scale = self.config.lr_scale if self.config.lr_scale is not None else LR_SCALES['adam' if adaptive else 'sgd']
        fused = adaptive and _fused_adam(params)
        self._group = {'host_lr': float(host_lr), 'optimizer': 'adam' if adaptive else 'sgd', 'lr_scale': scale,
                       'lr': scale * float(host_lr), 'fused': fused}
        group = {'params': params, 'name': 'cdtg', 'lr': self._group['lr'], 'weight_decay': self.config.weight_decay,
                 'decoupled_weight_decay': True, 'max_grad_norm': self.config.grad_clip or None}
        return [dict(group, fused=True) if fused else group]

    def optimizer_record(self) -> dict:
        r"""What results.json and checkpoints record about the plug-in's optimiser group (its learning rate once a
        recipe built it)."""
        return {'group': 'cdtg', 'lr_scale': self.config.lr_scale, 'weight_decay': self.config.weight_decay,
                'decoupled_weight_decay': True, 'max_grad_norm': self.config.grad_clip or None, **self._group}

    @property
    def num_parameters(self) -> int:
        r"""Trainable parameters of the plug-in (alignment modules, gates; LoRA adapters when on)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # --- checkpoints (the plug-in protocol of engine/factory.py) -----------------------------------------------
    name, label = 'cdtg', 'CD-TG'

    def record(self) -> dict:
        r"""What a checkpoint (and results.json) records about this plug-in."""
        return {'name': self.name, 'config': self.config.to_dict(), 'text_encoder': self.identity,
                'text_encoder_details': dict(self.encoder_record),
                'reading': self.reading(), 'parameters': self.num_parameters, 'descriptions': dict(self.texts_used),
                'optimizer': self.optimizer_record()}

    def check_record(self, saved: dict | None, path: str) -> None:
        r"""Refuse a checkpoint whose plug-in was trained with another text encoder than the one built now."""
        if saved is not None and saved.get('text_encoder') != self.identity:
            raise UserError(f'checkpoint {path} was trained with text encoder {saved.get("text_encoder")}, but this '
                            f'installation builds {self.identity}: '
                            f'{identity_mismatch(saved.get("text_encoder"), self.identity)}')


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    r"""start + weight·(end - start) in one pass (in the promoted dtype: LayerNorm's output is float32 under
    autocast; exactly `start` at weight 0), written into end's buffer when autograd does not need it and end has the
    result's shape (a text prototype [N,1,C] fused into P prototypes [N,P,C] does not)."""
    dtype = torch.promote_types(start.dtype, end.dtype)
    start, end = start.to(dtype), end.to(dtype)
    weight = weight.to(dtype) if isinstance(weight, torch.Tensor) else weight
    if torch.is_grad_enabled() or end.shape != start.shape:
        return torch.lerp(start, end, weight)
    return torch.lerp(start, end, weight, out=end)


def _fused_adam(params: list[torch.Tensor]) -> bool:
    r"""Whether torch has a fused Adam kernel for these parameters' device (CPU from torch 2.4 on): the plug-in's
    group then steps in one fused pass (for the default 24 M-parameter plug-in on CPU 16 ms instead of 168 ms a step;
    the host's groups keep their own implementation)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:                                      # an older torch: the default implementation
        return False
    return all(p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point() for p in params)


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    r"""Mean cosine of the rows of a and b [..., C] that are both non-zero (an empty mask pools a zero prototype);
    None if there is none."""
    a, b = a.flatten(0, -2), b.flatten(0, -2)
    keep = (a.norm(dim=-1) > 0) & (b.norm(dim=-1) > 0)
    return float(F.cosine_similarity(a[keep], b[keep], dim=-1).mean()) if bool(keep.any()) else None


def _per_set(text_proto: torch.Tensor, protos: torch.Tensor, nshot: int) -> torch.Tensor:
    r"""Text prototypes [B*K,C] -> [N,1,C] matching a host's prototype sets [N,P,C] (N = B*K, or B: shot mean)."""
    if protos.shape[0] != text_proto.shape[0]:
        if protos.shape[0] * nshot != text_proto.shape[0]:
            raise ValueError(f'prototype sets for {protos.shape[0]} items do not fit {text_proto.shape[0]} supports '
                             f'of {nshot} shots')
        text_proto = text_proto.view(protos.shape[0], nshot, -1).mean(dim=1)
    return text_proto.unsqueeze(1)

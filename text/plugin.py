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
fusion the plug-in is an exact identity on the host's outputs (in eval mode).

The alignment modules are sized per level by default (the level's width C: ≈ 24 M parameters for ResNet-50's
512/1024/2048 channels); `--cdtg-width W` aligns every level in one shared W-d space instead (per-level linear maps
C -> W -> C around one `TextAlign(W)`; the reference aligns 512-d features with one 512-d module, ≈ 1.6 M), so that
gains of "+CD-TG" can be told apart from added capacity.
"""
import argparse
import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from model.base import EpisodeContext, Hooks
from model.layers import masked_average_pooling, resized_masks
from text.descriptions import Descriptions, load_description_file, load_descriptions
from text.encoder import CLIP_MODELS, ClipTextEncoder, TextBank, identity_mismatch
from text.flags import ATTN_MODES, BACKGROUNDS, FUSIONS, add_args

TEXT_DIMS = {'RN50': 1024, 'ViT-B-32': 512, 'ViT-B-16': 512}
#: MAP(F, m) = Σ F·m / (Σ m + ε): the reference plug-in's `generate_prototype` and PATNet both use 1e-6.
MAP_EPS = 1e-6
#: The reference's single background caption for every dataset (Lilacis/CD_TG clip_prompts/background.json), used
#: with `--cdtg-background generic`.
GENERIC_BACKGROUND = ('A photo of the background, representing regions without specific anatomical structures or '
                      'target objects, often appearing uniform or low-textured.')


@dataclass
class CDTGConfig:
    r"""Everything that defines the plug-in (saved in checkpoints)."""
    clip: str = 'ViT-B-32'
    clip_weights: str = 'openai'
    attn: str = 'paper'
    alpha: float = 0.7
    fusion: str = 'fixed'
    style_aug: bool = True
    style_strength: float = 0.3
    text_lora: int = 0
    text_cache: str | None = None
    seed: int = 0
    maps: bool = False
    width: int | None = None
    background: str = 'domain'
    descriptions: str | None = None

    def validate(self) -> 'CDTGConfig':
        if self.clip not in CLIP_MODELS:
            raise UserError(f'--clip {self.clip!r}: choose one of {", ".join(CLIP_MODELS)}')
        if self.attn not in ATTN_MODES:
            raise UserError(f'--cdtg-attn {self.attn!r}: choose one of {", ".join(ATTN_MODES)}')
        if self.fusion not in FUSIONS:
            raise UserError(f'--fusion {self.fusion!r}: choose one of {", ".join(FUSIONS)}')
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f'--alpha must lie in [0, 1] (got {self.alpha})')
        if self.fusion == 'learned' and not 0.0 < self.alpha < 1.0:
            raise UserError('--fusion learned initialises a sigmoid gate at --alpha, which must lie in (0, 1)')
        if self.text_lora < 0:
            raise UserError('--text-lora must be >= 0')
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                       or self.width < 8 or self.width % 8):
            raise UserError(f'--cdtg-width must be a multiple of 8 (the attention heads), e.g. 512 (got {self.width})')
        if self.background not in BACKGROUNDS:
            raise UserError(f'--cdtg-background {self.background!r}: choose one of {", ".join(BACKGROUNDS)}')
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class TextAlign(nn.Module):
    r"""Aligns a feature map [N,C,h,w] with text, per pixel: LayerNorm_C(F + attention(F, text)).

    mode 'paper': the reference design (MLP d->d->d on the text, then MultiheadAttention(d, 8) with the pixels as
        queries and the same text vector repeated at every position as keys and values). With identical keys the
        attention weights are uniform, so the output is exactly LayerNorm(F + u(t)), u(t) = W_o(W_v·MLP(t) + b_v) + b_o,
        computed here in that closed form (W_q, W_k would receive zero gradient and are not created).
    mode 'attributes': real cross-attention of every pixel over the class's caption and attribute sentences.
    The text embedding is first projected to the level's width C.
    """

    def __init__(self, text_dim: int, channels: int, mode: str = 'paper', heads: int = 8):
        super().__init__()
        self.mode = mode
        self.proj = nn.Linear(text_dim, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, channels))
        if mode == 'paper':
            self.value = nn.Linear(channels, channels)
            self.out = nn.Linear(channels, channels)
        else:
            self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm = nn.LayerNorm(channels)

    def text_bias(self, text: torch.Tensor) -> torch.Tensor:
        r"""u(t) for the paper mode: [N,D] -> [N,C]."""
        return self.out(self.value(self.mlp(self.proj(text))))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        r"""What `align_tokens` needs of the text [N,T,D]: u(t) [N,C] (paper mode, from text[:, 0]) or the keys
        [N,T,C] (attributes mode). It depends on the text only, so the taps of one level (and, in a shared space,
        every level) compute it once: for 2048-d maps it reads ~68 MB of weights, more than aligning a tap costs."""
        if self.mode == 'paper':
            return self.text_bias(text[:, 0])
        return self.mlp(self.proj(text))

    def align_tokens(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None,
                     encoded: torch.Tensor | None = None) -> torch.Tensor:
        r"""x [N,L,C] (pixels as tokens); text [N,T,D] with mask [N,T] (True = real sentence) -> [N,L,C].
        `encoded`: `encode_text(text)` if the caller already has it."""
        encoded = self.encode_text(text) if encoded is None else encoded
        if self.mode == 'paper':
            x = x + encoded.unsqueeze(1)
        else:
            pad = None if mask is None else ~mask
            x = x + self.attn(x, encoded, encoded, key_padding_mask=pad, need_weights=False)[0]
        return self.norm(x)

    def forward(self, feat: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None,
                encoded: torch.Tensor | None = None) -> torch.Tensor:
        r"""feat [N,C,h,w]; text [N,T,D] with mask [N,T]. paper mode uses text[:, 0]."""
        n, c, h, w = feat.shape
        x = self.align_tokens(feat.flatten(2).transpose(1, 2), text, mask, encoded)   # [N,C,h,w] -> [N,hw,C]
        return x.transpose(1, 2).reshape(n, c, h, w)                                   # [N,hw,C] -> [N,C,h,w]

    def pooled(self, feat: torch.Tensor, texts: list[torch.Tensor], weights: list[torch.Tensor],
               eps: float, encoded: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        r"""MAP(A(F, t_i), w_i) = Σ_p w_p A(F,t)_p / (Σ_p w_p + eps) for the paper mode, without forming A(F).

        With x_p = F_p + u (u = `text_bias(t)`), LayerNorm's per-pixel moments follow from F's and u's:
        μ_p = mean_c F_p + ū, σ²_p = var_c F_p + var u + 2 cov_c(F_p, u); then with a_p = w_p / sqrt(σ²_p + ε_LN)
            Σ_p w_p LN(x_p) = γ ⊙ (Σ_p a_p F_p + u Σ_p a_p − Σ_p a_p μ_p) + β Σ_p w_p.
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
            u = torch.stack([e.to(f.dtype) for e in encoded], dim=1)                         # [N,T,C]
            w = torch.stack([x.flatten(1).to(f.dtype) for x in weights], dim=1)              # [N,T,L]
            u_mean = u.mean(dim=2, keepdim=True)                                             # [N,T,1]
            u_c = u - u_mean
            var = (torch.bmm(u_c, f).mul_(2 / f.shape[1]).add_(var_f)
                   .add_(u_c.pow(2).mean(dim=2, keepdim=True)))                              # [N,T,L]
            a = w * var.clamp_min_(0).add_(self.norm.eps).rsqrt_()
            total = w.sum(dim=2, keepdim=True)                                               # [N,T,1]
            num = (torch.bmm(a, f.transpose(1, 2)) + u * a.sum(dim=2, keepdim=True)
                   - (a * (mean_f + u_mean)).sum(dim=2, keepdim=True))                      # [N,T,C]
            out = (self.norm.weight.to(f.dtype) * num + self.norm.bias.to(f.dtype) * total) / (total + eps)
        return list(out.unbind(dim=1))


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
        c_mean, c_std = content.mean(dim=(2, 3), keepdim=True), content.std(dim=(2, 3), keepdim=True)
        s_mean, s_std = style.mean(dim=(2, 3), keepdim=True), style.std(dim=(2, 3), keepdim=True)
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
        self.identity = self.text_encoder.identity if self.text_encoder is not None else self.bank.identity
        if config.width is None:
            self.align = nn.ModuleList([TextAlign(text_dim, c, config.attn) for c in widths])
            self.shared_align = None
        else:
            self.align = nn.ModuleList([LevelProjection(c, config.width) for c in widths])
            self.shared_align = TextAlign(text_dim, config.width, config.attn)
        if config.fusion == 'learned':
            logit = math.log(config.alpha / (1 - config.alpha))
            self.alpha_logit = nn.Parameter(torch.full((len(levels),), logit))
        if plugin_point == 'features':
            self.gate = nn.Parameter(torch.zeros(len(levels)))
        self.style = MedicalStyle(config.style_strength) if config.style_aug else None
        # a --descriptions file is read (and validated) now; it serves the benchmark it declares
        self.file_descriptions = load_description_file(config.descriptions) if config.descriptions else None
        self.benchmark: str | None = None
        self.class_names: list[str] = []
        self.texts_used: dict[str, dict] = {}
        self._from_file: tuple[str, list[str]] | None = None      # what `bind` bound from a description file
        self._encodings: dict[int, tuple] = {}                      # `_table_encoding`'s reusable results

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
        if self.bank is not None:
            flat = self.bank.embed([t for g in groups for t in g])
            table = torch.zeros(len(groups), t_max, flat.shape[-1])
            table[mask] = flat
            self.register_buffer('text_table', table.to(device), persistent=False)
        else:
            tokens = self.text_encoder.tokenize([t for g in groups for t in g])
            table = torch.zeros(len(groups), t_max, tokens.shape[-1], dtype=tokens.dtype)
            table[mask] = tokens
            self.register_buffer('token_table', table.to(device), persistent=False)
        self.register_buffer('text_mask', mask.to(device), persistent=False)
        self.benchmark, self.class_names = key, list(class_names)
        if record is None:
            typed = '\n'.join(t for g in groups for t in g).encode()
            record = {'file': None, 'sha256': hashlib.sha256(typed).hexdigest(), 'source': 'typed', 'texts': groups}
        self.texts_used[key] = record
        self._from_file = None                   # `bind` sets it after this call, a direct call leaves it unset
        self._encodings = {}

    def _apply(self, fn, *args, **kwargs):
        self._encodings = {}                     # .to(), .double(), ...: the parameters may be new tensors
        return super()._apply(fn, *args, **kwargs)

    def _texts(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Embeddings [N,T,D] and mask [N,T] of the given rows of the bound table (last row = background)."""
        if self.benchmark is None:
            raise RuntimeError('CDTG.bind(benchmark, class_names) must be called before running episodes')
        mask = self.text_mask[rows]
        if self.bank is not None:
            return self.text_table[rows], mask
        # LoRA: encode in the graph, once per distinct row of this batch
        uniq, inverse = torch.unique(rows, return_inverse=True)
        m = self.text_mask[uniq]
        emb = self.text_encoder(self.token_table[uniq][m])                 # [n_sentences, D]
        table = emb.new_zeros(len(uniq), m.shape[1], emb.shape[-1])
        table[m] = emb
        return table[inverse], mask

    def class_texts(self, class_id: torch.Tensor):
        return self._texts(class_id.long())

    # --- alignment and fusion ---------------------------------------------------------------------------------
    def aligned(self, level: int, feat: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                encoded: torch.Tensor | None = None) -> torch.Tensor:
        r"""A(F) of one level: [N,C,h,w] -> [N,C,h,w] (per-level module, or the shared W-d space). `encoded`: the
        level's `encoded_text(level, text)` if the caller has it (the taps of a level share it)."""
        if self.shared_align is None:
            return self.align[level](feat, text, mask, encoded)
        return self.align[level](feat, self.shared_align, text, mask, encoded)

    def encoded_text(self, level: int, text: torch.Tensor) -> torch.Tensor:
        r"""The text as the level's alignment uses it (`TextAlign.encode_text`; one for all levels in a shared
        space)."""
        return self._text_layers(level)[1].encode_text(text)

    def _text_layers(self, level: int) -> tuple[int, TextAlign]:
        r"""The `TextAlign` that encodes texts for `level`, and a key naming it (-1: the shared W-d space, which
        serves every level)."""
        return (level, self.align[level]) if self.shared_align is None else (-1, self.shared_align)

    def image_weight(self, level: int):
        if self.config.fusion == 'learned':
            return torch.sigmoid(self.alpha_logit[level])
        return self.config.alpha

    # --- hooks ------------------------------------------------------------------------------------------------
    def support_features(self, feats: list[torch.Tensor], ctx: EpisodeContext) -> list[torch.Tensor]:
        if self.style is not None:
            feats = self.style(feats)                                      # identity in eval mode
        if self.point == 'features' or self.config.maps:
            feats = self._mixed(feats, ctx.class_id.repeat_interleave(ctx.nshot))
        return feats

    def query_features(self, feats: list[torch.Tensor], ctx: EpisodeContext) -> list[torch.Tensor]:
        if self.point == 'features' or self.config.maps:
            feats = self._mixed(feats, ctx.class_id)
        return feats

    def _mixed(self, feats: list[torch.Tensor], class_id: torch.Tensor) -> list[torch.Tensor]:
        r"""Maps moved towards their class-text alignment: F + w·(A(F) - F) with w = g·(1-α) (gated, feature
        hosts) or w = 1-α (α·F + (1-α)·A(F), prototype hosts with --cdtg-features)."""
        text, mask = self.class_texts(class_id)
        encoded = self._encoder_cache()
        out = []
        for i, f in enumerate(feats):
            level = self.tap_level[i]
            weight = 1 - self.image_weight(level)
            if self.point == 'features':
                weight = self.gate[level] * weight
            u = encoded(level, 'class', class_id.long(), text)
            out.append(_lerp(f, self.aligned(level, f, text, mask, u), weight))
        return out

    def _encoder_cache(self) -> Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor]:
        r"""The text encodings of one hook call, `encoded(level, which, rows, text)` = `encoded_text(level, text)`
        for `text` = rows `rows` of the bound table. The taps of a level (every level, in a shared space) share them:
        for 2048-d maps the text layers read more weights than aligning a tap costs. With frozen text embeddings
        they are the rows of the whole table's encoding (`_table_encoding`), which is kept across calls while
        nothing it depends on changes; with LoRA (texts encoded in the graph) they are computed once per call."""
        cache: dict[tuple[int, str], torch.Tensor] = {}
        table = self.bank is not None

        def encoded(level: int, which: str, rows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            key = (self._text_layers(level)[0], 'table' if table else which)
            if key not in cache:
                cache[key] = self._table_encoding(level) if table else self.encoded_text(level, text)
            return cache[key][rows] if table else cache[key]
        return encoded

    def _table_encoding(self, level: int) -> torch.Tensor:
        r"""`encode_text` of every row of the bound text table (classes, then background) for `level`'s alignment.
        Without autograd it is computed once and reused until the table is rebound (`bind_texts`), the module is
        converted or moved (`_apply`), a parameter of the alignment changes in place (an optimizer step,
        load_state_dict: each bumps the tensor's version) or the autocast state differs; under autograd it is
        recomputed in the graph at every call."""
        key, module = self._text_layers(level)
        params = list(module.parameters())
        device = self.text_table.device.type
        stamp = (tuple((p.data_ptr(), p._version, p.dtype) for p in params),
                 torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        cached = self._encodings.get(key)
        if not grad and cached is not None and cached[0] == stamp:
            return cached[1]
        table = module.encode_text(self.text_table)
        if not grad:
            self._encodings[key] = (stamp, table)
        return table

    def prototypes(self, fg: list[torch.Tensor], bg: list[torch.Tensor | None], feats: list[torch.Tensor],
                   ctx: EpisodeContext) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        r"""Fuse text-guided prototypes into the host's prototype sets.

        Per level: FP_t = MAP(A(F_s, class text), m), BP_t = MAP(A(F_s, background text), 1 - m) per support
        [B*K,C]; averaged over the K shots when the host's sets are per episode (N = B); then every prototype of a
        set is fused with its text prototype: FP_p <- α FP_p + (1 - α) FP_t for p = 1..P (PMMs' mixture components
        each move towards the same text prototype), and likewise BP_p with BP_t. A host without background
        prototypes (bg None) keeps None. With --cdtg-features the host pooled its prototypes from the aligned maps,
        which already makes them the fused ones (see the module docstring): nothing changes here.
        """
        if self.point != 'prototypes' or self.config.maps:
            return fg, bg
        n = feats[0].shape[0]
        k = ctx.nshot
        cls_rows = ctx.class_id.long().repeat_interleave(k)                            # per support
        bg_rows = torch.full((n,), len(self.class_names), dtype=torch.long, device=feats[0].device)
        cls_text, cls_mask = self._texts(cls_rows)
        bg_text, bg_mask = self._texts(bg_rows)
        closed_form = self.config.attn == 'paper' and self.shared_align is None
        encoded = self._encoder_cache()
        masks = resized_masks(ctx.support_masks, feats)       # the support masks at each tap size, resized once
        new_fg, new_bg = [], []
        for i, f in enumerate(feats):
            level = self.tap_level[i]
            a = self.image_weight(level)
            m = masks[tuple(f.shape[-2:])]
            use_bg = bg[i] is not None
            u_cls = encoded(level, 'class', cls_rows, cls_text)
            u_bg = encoded(level, 'background', bg_rows, bg_text) if use_bg else None
            if closed_form:                                   # MAP of the aligned maps without forming them
                texts, weights, us = ([cls_text, bg_text], [m, 1 - m], [u_cls, u_bg]) if use_bg else \
                    ([cls_text], [m], [u_cls])
                pooled = self.align[level].pooled(f, texts, weights, MAP_EPS, us)
            else:
                pooled = [masked_average_pooling(self.aligned(level, f, cls_text, cls_mask, u_cls), m, eps=MAP_EPS)]
                if use_bg:
                    pooled.append(masked_average_pooling(self.aligned(level, f, bg_text, bg_mask, u_bg), 1 - m,
                                                         eps=MAP_EPS))
            new_fg.append(a * fg[i] + (1 - a) * _per_set(pooled[0], fg[i], k))             # FP_t [B*K,C]
            new_bg.append(a * bg[i] + (1 - a) * _per_set(pooled[1], bg[i], k) if use_bg else None)
        return new_fg, new_bg

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
        return {'maps': maps,
                'alpha': 'image weight (reference code: FFAttention weight_image 0.7, weight_text 0.3)'
                         + (', learned per level' if self.config.fusion == 'learned' else ''),
                'width': 'per level' if self.config.width is None else f'shared {self.config.width}-d',
                'background': self.config.background if uses_background else 'not used',
                'map_eps': MAP_EPS}

    @property
    def num_parameters(self) -> int:
        r"""Trainable parameters of the plug-in (alignment modules, gates; LoRA adapters when on)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # --- command line and checkpoints (the plug-in protocol of engine/factory.py) -----------------------------
    name, label = 'cdtg', 'CD-TG'

    add_args = staticmethod(add_args)                               # text/flags.py (torch-free)

    @staticmethod
    def enabled(config: dict) -> bool:
        return bool(config.get('cdtg'))

    @staticmethod
    def config_keys() -> tuple[str, ...]:
        r"""The run-configuration keys that belong to the plug-in."""
        return ('cdtg', 'clip', 'clip_weights', 'cdtg_attn', 'alpha', 'fusion', 'cdtg_features', 'cdtg_width',
                'cdtg_background', 'descriptions', 'no_style_aug', 'text_lora', 'text_cache')

    @classmethod
    def from_config(cls, config: dict, model) -> 'CDTG':
        r"""A plug-in sized for `model` (a FewShotSegmenter) from a run configuration (train.py's flags; keys
        added since are optional, so older checkpoints rebuild as they were trained)."""
        point = getattr(model, 'plugin_point', None)
        if point not in ('features', 'prototypes'):
            raise UserError(f'method {type(model).__name__} declares no CD-TG plug-in point')
        cfg = CDTGConfig(clip=config['clip'], clip_weights=config['clip_weights'], attn=config['cdtg_attn'],
                         alpha=float(config['alpha']), fusion=config['fusion'], style_aug=not config['no_style_aug'],
                         text_lora=int(config['text_lora']), text_cache=config.get('text_cache'),
                         seed=int(config.get('seed', 0)), maps=bool(config.get('cdtg_features', False)),
                         width=config.get('cdtg_width'), background=config.get('cdtg_background') or 'domain',
                         descriptions=config.get('descriptions'))
        return cls(model.feature_channels, model.feature_levels, point, cfg)

    @classmethod
    def test_overrides(cls, config: dict, args: argparse.Namespace, path: str) -> dict:
        r"""The checkpoint's run configuration with test.py's plug-in flags applied (and checked). The descriptions
        are test.py's own: `--descriptions FILE` (for the tested benchmark) or the shipped ones."""
        has = cls.enabled(config)
        if getattr(args, 'cdtg', False) and not has:
            raise UserError(f'checkpoint {path} was trained without the CD-TG plug-in, so --cdtg cannot be used with '
                            'it (drop --cdtg, or train with train.py --cdtg)')
        config = dict(config)
        for key in ('alpha', 'clip_weights', 'text_cache', 'descriptions'):
            value = getattr(args, key, None)
            if value is None:
                continue
            if not has:
                raise UserError(f'--{key.replace("_", "-")} applies to CD-TG checkpoints only; {path} has no plug-in')
            if key == 'alpha' and config.get('fusion') == 'learned':
                raise UserError(f'--alpha cannot override {path}: its fusion weights were learned (--fusion learned)')
            if key == 'alpha' and _plugin_point(config) == 'features':
                raise UserError(f'--alpha cannot override {path}: on {config["method"]} the plug-in is a learned '
                                'residual gate F + g(1-alpha)(A(F) - F), so alpha only rescales the learned g and '
                                'has no image-weight meaning (an override would run the model off its training '
                                'distribution)')
            if key == 'descriptions':
                declared = load_description_file(value).benchmark
                if declared != args.benchmark:
                    raise UserError(f'--descriptions {value} describes benchmark {declared!r}, but test.py runs '
                                    f'{args.benchmark!r}; pass the file written for {args.benchmark!r}')
            config[key] = value
        if has:
            config['descriptions'] = getattr(args, 'descriptions', None)
        return config

    def record(self) -> dict:
        r"""What a checkpoint (and results.json) records about this plug-in."""
        return {'name': self.name, 'config': self.config.to_dict(), 'text_encoder': self.identity,
                'reading': self.reading(), 'parameters': self.num_parameters, 'descriptions': dict(self.texts_used)}

    def check_record(self, saved: dict | None, path: str) -> None:
        r"""Refuse a checkpoint whose plug-in was trained with another text encoder than the one built now."""
        if saved is not None and saved.get('text_encoder') != self.identity:
            raise UserError(f'checkpoint {path} was trained with text encoder {saved.get("text_encoder")}, but this '
                            f'installation builds {self.identity}: '
                            f'{identity_mismatch(saved.get("text_encoder"), self.identity)}')


def _plugin_point(config: dict) -> str | None:
    r"""The plug-in point of a run configuration's method (None for a method this code does not know)."""
    from model import METHODS
    cls = METHODS.get(config.get('method'))
    return getattr(cls, 'plugin_point', None)


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    r"""start + weight·(end - start) in one pass (in the promoted dtype: LayerNorm's output is float32 under
    autocast), written into end's buffer when autograd does not need it."""
    dtype = torch.promote_types(start.dtype, end.dtype)
    start, end = start.to(dtype), end.to(dtype)
    weight = weight.to(dtype) if isinstance(weight, torch.Tensor) else weight
    if torch.is_grad_enabled():
        return torch.lerp(start, end, weight)
    return torch.lerp(start, end, weight, out=end)


def _per_set(text_proto: torch.Tensor, protos: torch.Tensor, nshot: int) -> torch.Tensor:
    r"""Text prototypes [B*K,C] -> [N,1,C] matching a host's prototype sets [N,P,C] (N = B*K, or B: shot mean)."""
    if protos.shape[0] != text_proto.shape[0]:
        if protos.shape[0] * nshot != text_proto.shape[0]:
            raise ValueError(f'prototype sets for {protos.shape[0]} items do not fit {text_proto.shape[0]} supports '
                             f'of {nshot} shots')
        text_proto = text_proto.view(protos.shape[0], nshot, -1).mean(dim=1)
    return text_proto.unsqueeze(1)

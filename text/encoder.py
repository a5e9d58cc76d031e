r"""The text encoder (OpenAI CLIP through open_clip; BiomedCLIP and PubMedCLIP through text/towers.py), a
content-addressed embedding cache, and optional LoRA adapters that train."""
import functools
import hashlib
import os
import re
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from text import towers
from text.settings import CLIP_MODELS, PUBLISHED_WEIGHTS, TEXT_ENCODERS

# LoRA goes on the text transformer's MLP linears. Why not `attn.out_proj` as in the reference: nn.MultiheadAttention
# hands out_proj.weight to F.multi_head_attention_forward and never calls the (LoRA-wrapped) module, so adapters there
# receive no gradient and change nothing.
LORA_TARGETS = ('mlp.c_fc', 'mlp.c_proj')
#: BiomedCLIP's BERT: the MLP linears of every layer (not the attention output, also named `output.dense`).
BERT_LORA_TARGETS = r'.*layer\.\d+\.(intermediate|output)\.dense'


def default_cache_dir() -> Path:
    return Path(os.environ.get('CDTG_CACHE', Path.home() / '.cache' / 'cdtg')) / 'text-embeddings'


def file_digest(path: Path) -> str:
    r"""The first 16 hex digits of the file's SHA-256 (computed once per file version: weight files are large)."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()[:16]


#: Activation of the text transformer. OpenAI's CLIP weights were trained with QuickGELU (x·σ(1.702x)); open_clip's
#: plain configs (RN50, ViT-B-32, ViT-B-16) use nn.GELU, and `create_model(name, pretrained='openai')` loads the
#: weights into that config since open_clip 2.29 (with only a warning; older releases built QuickGELU for 'openai').
#: Every path here builds QuickGELU explicitly, so the embeddings do not depend on the installed release.
ACTIVATIONS = ('quickgelu', 'gelu')
ACTIVATION = 'quickgelu'


def open_clip_major() -> str:
    import open_clip
    return open_clip.__version__.split('.')[0]


def weights_identity(model: str, weights: str, seed: int = 0, activation: str = ACTIVATION) -> str:
    r"""A string that changes whenever the text encoder's embeddings could: model, weight source (file hash / seed),
    activation and open_clip's major version (the embedding cache and checkpoints are keyed by it); for BiomedCLIP
    and PubMedCLIP also the tokenizer (vocabulary digest) and context length."""
    import open_clip
    if model not in CLIP_MODELS:
        raise UserError(f'--clip {model!r}: choose one of {", ".join(CLIP_MODELS)}')
    if activation not in ACTIVATIONS:
        raise ValueError(f'unknown text-encoder activation {activation!r}')
    if TEXT_ENCODERS[model].family != 'openai':
        return _medical_identity(model, weights, seed)
    build = f'{activation}-open_clip{open_clip_major()}'
    if weights in PUBLISHED_WEIGHTS:
        return f'{model}-openai-{build}'
    if weights == 'none':
        return f'{model}-random-seed{seed}-{activation}-open_clip{open_clip.__version__}'
    path = Path(weights)
    if not path.is_file():
        raise UserError(f'--clip-weights {weights}: no such file (expected openai, none, or a local copy of the '
                        f'OpenAI {model} weights, e.g. open_clip_pytorch_model.bin from {TEXT_ENCODERS[model].hub})')
    return f'{model}-file{file_digest(path)}-{build}'


def _medical_identity(model: str, weights: str, seed: int) -> str:
    spec = TEXT_ENCODERS[model]
    if weights in PUBLISHED_WEIGHTS:
        source = f'hub-{spec.hub.replace("/", "_")}'
    elif weights == 'none':
        source = f'random-seed{seed}'
    else:
        source = f'file{file_digest(towers.weight_file(model, weights))}'
    if spec.family == 'biomedclip':
        import transformers
        vocab = None if weights in PUBLISHED_WEIGHTS + ('none',) else towers.biomedclip_vocab(weights)
        tokenizer = ('vocab-hub' if weights in PUBLISHED_WEIGHTS else
                     towers.OFFLINE_VOCAB if vocab is None else f'vocab{file_digest(vocab)}')
        build = f'transformers{transformers.__version__.split(".")[0]}'
    else:
        tokenizer, build = 'clip-bpe', f'open_clip{open_clip_major()}'
    return f'{model}-{source}-{spec.activation}-{build}-{tokenizer}-ctx{spec.context}'


def encoder_record(model: str, weights: str, identity: str) -> dict:
    r"""The text encoder in words, for checkpoints and results.json (the identity string is the exact key)."""
    spec = TEXT_ENCODERS[model]
    digest = None
    if weights not in PUBLISHED_WEIGHTS + ('none',):
        path = towers.weight_file(model, weights) if spec.family != 'openai' else Path(weights)
        digest = file_digest(path) if path.is_file() else None
    tokenizer = spec.tokenizer
    if spec.family == 'biomedclip' and weights == 'none':
        tokenizer = f'offline stand-in ({towers.OFFLINE_VOCAB}: BERT special tokens and ASCII characters)'
    source = f'published: {spec.hub} (Hugging Face hub)' if weights in PUBLISHED_WEIGHTS else weights
    return {'name': model, 'weights': source,
            'weights_sha256_16': digest, 'tokenizer': tokenizer, 'activation': spec.activation,
            'context_length': spec.context, 'dim': spec.dim, 'identity': identity}


def identity_mismatch(saved: str | None, current: str) -> str:
    r"""Why a text encoder recorded as `saved` (in a checkpoint) is not the one `current` builds, in words."""
    if not saved:
        return 'the checkpoint records no text encoder'
    if saved.split('-', 1)[0] in ('biomedclip', 'pubmedclip'):
        return ('pass the same --clip-weights as in training (the same weight file and, for biomedclip, the same '
                'vocabulary), with the transformers / open_clip major version it names')
    if not any(f'-{a}-open_clip' in saved for a in ACTIVATIONS):
        return ('the checkpoint was written before the text encoder\'s activation was part of its identity; with '
                '--clip-weights openai and open_clip >= 2.29 its text was embedded with plain GELU, not the QuickGELU '
                'that OpenAI\'s weights need, and its alignment modules were fit to those embeddings; retrain the '
                'plug-in')
    major = saved.rsplit('open_clip', 1)[1].split('.')[0]
    if major != open_clip_major():
        return (f'it was trained with open_clip {major}.x and open_clip {open_clip_major()}.x is installed; install '
                f'open_clip {major}.x (pip install "open_clip_torch=={major}.*") or retrain')
    return 'pass the same CLIP weights (--clip-weights) as in training'


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


class ClipTextEncoder(nn.Module):
    r"""The text tower of a CLIP-style model (the image tower is dropped), frozen.

    Args:
        model: RN50 | ViT-B-32 | ViT-B-16 (OpenAI CLIP; RN50 embeds in 1024-d, the ViTs in 512-d), biomedclip
            (PubMedBERT text tower, 512-d, 256 tokens) or pubmedclip (OpenAI's ViT-B/32 text transformer fine-tuned
            on ROCO, 512-d); see text/towers.py.
        weights: 'openai' or 'hub' (the published weights, downloaded from the Hugging Face hub), a local file with
            those weights (biomedclip/pubmedclip: or the downloaded hub folder), or 'none' (random, seeded, with a
            loud warning; for tests and offline runs).
        activation: of OpenAI CLIP's text transformer; 'quickgelu' (OpenAI's weights need it) on every path, whatever
            the open_clip release would default to ('gelu' exists to show that the identity tracks it). The medical
            encoders have their own (TEXT_ENCODERS).
        lora_rank: > 0 adds trainable LoRA adapters (peft; alpha 32, dropout 0.1 as in the reference) to the text
            transformer's MLP layers. Only the adapters are saved in `state_dict`; the base weights come from
            `weights` again when a checkpoint is loaded.
    Output embeddings are L2-normalised.
    """

    def __init__(self, model: str = 'ViT-B-32', weights: str = 'openai', lora_rank: int = 0, seed: int = 0,
                 activation: str = ACTIVATION):
        super().__init__()
        import open_clip
        self.identity = weights_identity(model, weights, seed, activation)      # refuses an unknown model
        spec = TEXT_ENCODERS[model]
        self.record = encoder_record(model, weights, self.identity)
        self.model_name, self.lora_rank, self.context = model, lora_rank, spec.context
        path = towers.weights_path(model, weights) if spec.family != 'openai' else None   # found before building
        if spec.family == 'biomedclip':
            self.tokenizer = towers.WordPiece(towers.biomedclip_vocab(weights), spec.context)
            self.clip = _random_init(towers.build_bert_tower, model, seed, warn=path is None)
            if path is not None:
                towers.load_biomedclip(self.clip, path)
        elif spec.family == 'pubmedclip':                      # OpenAI's ViT-B/32 text transformer, converted weights
            self.clip = _random_init(partial(open_clip.create_model, spec.architecture, pretrained=None,
                                             force_quick_gelu=True), model, seed, warn=path is None)
            del self.clip.visual
            if path is not None:
                towers.load_pubmedclip(self.clip, path)
            self.tokenizer = open_clip.get_tokenizer(spec.architecture)
        else:
            self.clip = _build_clip(model, weights, seed, activation)
            del self.clip.visual                               # only the text tower is used
            self.tokenizer = open_clip.get_tokenizer(model)
        self.clip.requires_grad_(False)
        if lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model
            targets = BERT_LORA_TARGETS if spec.family == 'biomedclip' else list(LORA_TARGETS)
            config = LoraConfig(r=lora_rank, lora_alpha=32, lora_dropout=0.1, bias='none', target_modules=targets)
            inject_adapter_in_model(config, self.clip.transformer)
            adapters = [p for n, p in self.named_parameters() if 'lora_' in n]
            if not adapters:
                raise RuntimeError('peft injected no LoRA adapter into the CLIP text transformer')
            for p in adapters:
                p.requires_grad_(True)
        # Frozen base weights are not saved (they are re-created from `weights`), so they are not "missing" either.
        self._base_keys = {k for k in self.clip.state_dict(keep_vars=True) if 'lora_' not in k}
        self.register_state_dict_post_hook(_keep_only_adapters)
        self.register_load_state_dict_post_hook(self._ignore_missing_base_weights)
        self.eval()

    def _ignore_missing_base_weights(self, module, incompatible_keys):
        def is_base(key: str) -> bool:
            return any(key[m.end():] in self._base_keys for m in re.finditer(r'(?:^|\.)clip\.', key))
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not is_base(k)]

    @property
    def dim(self) -> int:
        if isinstance(self.clip, _hf_text_encoder()):
            return self.clip.output_dim
        proj = self.clip.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def tokenize(self, texts: list[str], labels: list[str] | None = None) -> torch.Tensor:
        r"""Tokens [N, context]. A text longer than the context is truncated, with a warning that names its class
        (`labels[i]`: the class of texts[i]) and the text."""
        if isinstance(self.tokenizer, towers.WordPiece):
            tokens, n_real = self.tokenizer(texts)
        else:
            tokens = self.tokenizer(texts)
            n_real = [len(self.tokenizer.encode(t)) + 2 for t in texts] if hasattr(self.tokenizer, 'encode') else []
        too_long = [i for i, n in enumerate(n_real) if n > tokens.shape[1]]
        if too_long:
            names = sorted({labels[i] for i in too_long}) if labels else []
            which = f' (class{"es" if len(names) > 1 else ""} {", ".join(names)})' if names else ''
            warnings.warn(f'{len(too_long)} description text(s){which} exceed the {self.model_name} tokenizer\'s '
                          f'{tokens.shape[1]} tokens and are truncated, e.g. {texts[too_long[0]][:80]!r}',
                          stacklevel=2)
        return tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        r"""tokens [N,77] -> L2-normalised embeddings [N,D].

        Same result as open_clip's `encode_text`, but the transformer runs only over the columns up to the batch's
        last non-padding token: with CLIP's causal mask the end-of-text token, whose output is pooled, never attends
        to later positions, so the padding cannot change it (checked in tests/test_cdtg.py). Descriptions use about
        half of the 77 positions, which halves the cost of encoding them."""
        clip = self.clip
        if isinstance(clip, _hf_text_encoder()):
            # BERT masks padding (token 0) out of attention, so trailing all-padding columns change nothing
            used = (tokens != 0).any(dim=0).nonzero()
            return F.normalize(clip(tokens[:, :int(used.max()) + 1 if used.numel() else 1]), dim=-1)
        if getattr(clip, 'text_pool_type', None) != 'argmax' or getattr(clip, 'attn_mask', None) is None:
            return F.normalize(clip.encode_text(tokens), dim=-1)
        from open_clip.transformer import text_global_pool
        used = (tokens != 0).any(dim=0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        t = tokens[:, :length]
        x = clip.token_embedding(t) + clip.positional_embedding[:length]
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = text_global_pool(clip.ln_final(x), t, 'argmax')
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    @torch.no_grad()
    def encode(self, texts: list[str], batch: int = 64, labels: list[str] | None = None) -> torch.Tensor:
        r"""Embed texts without gradient (frozen use). Returns [N, D] on the encoder's device."""
        device = next(self.clip.parameters()).device
        labels = labels or [''] * len(texts)
        out = [self(self.tokenize(texts[i:i + batch], labels[i:i + batch]).to(device))
               for i in range(0, len(texts), batch)]
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=device)


def _keep_only_adapters(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix) and 'lora_' not in k]:
        del state_dict[key]


def _hf_text_encoder() -> type:
    from open_clip.hf_model import HFTextEncoder
    return HFTextEncoder


def _random_init(build, model: str, seed: int, warn: bool = True) -> nn.Module:
    r"""`build()` under the seed (random weights reproducible across runs); `warn`: the loud warning of 'none' (off
    when published weights are loaded into the tower next)."""
    if warn:
        warnings.warn(f'{model} text encoder has RANDOM weights (--clip-weights none): text guidance is meaningless '
                      'beyond tests; use --clip-weights openai (the published weights) or a local copy', stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _quiet(build)


def _build_clip(model: str, weights: str, seed: int, activation: str = ACTIVATION):
    import open_clip
    quick = activation == 'quickgelu'
    if weights == 'none':
        clip = _random_init(partial(open_clip.create_model, model, pretrained=None, force_quick_gelu=quick),
                            f'CLIP {model}', seed)
    elif weights in PUBLISHED_WEIGHTS:
        try:
            clip = _quiet(open_clip.create_model, model, pretrained='openai', force_quick_gelu=quick)
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise UserError(
                f'could not obtain the OpenAI CLIP {model} weights ({type(err).__name__}: {_first_line(err)}).\n'
                f'  This machine is probably offline. On a connected machine run\n'
                f'    python -c "import open_clip; open_clip.create_model(\'{model}\', pretrained=\'openai\')"\n'
                f'  (it fills the Hugging Face cache, $HF_HOME), or download open_clip_pytorch_model.bin from the\n'
                f'  hub repository {TEXT_ENCODERS[model].hub} and pass --clip-weights '
                f'/path/to/open_clip_pytorch_model.bin.'
            ) from err
    else:
        try:
            clip = _quiet(open_clip.create_model, model, pretrained=str(weights), force_quick_gelu=quick)
        except Exception as err:  # noqa: BLE001
            raise UserError(f'could not load CLIP {model} weights from {weights}: {_first_line(err)}') from err
    if text_activation(clip) != activation:
        raise RuntimeError(f'open_clip {open_clip.__version__} built the {model} text transformer with '
                           f'{text_activation(clip)}, not {activation}')
    return clip


def text_activation(clip: nn.Module) -> str:
    r"""'quickgelu' or 'gelu': the activation of an open_clip model's text transformer."""
    from open_clip.transformer import QuickGELU
    return 'quickgelu' if any(isinstance(m, QuickGELU) for m in clip.transformer.modules()) else 'gelu'


def _quiet(fn, *args, **kwargs):
    import logging
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)      # open_clip logs "No pretrained weights loaded" at WARNING for pretrained=None
    try:
        return fn(*args, **kwargs)
    finally:
        logger.setLevel(level)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [''])[0][:300]


class EmbeddingCache:
    r"""Frozen text embeddings on disk, one file per encoder identity, keyed by the SHA-256 of the exact text."""

    def __init__(self, root: str | Path, identity: str):
        self.path = Path(root) / f'{re.sub(r"[^A-Za-z0-9._-]+", "_", identity)}.pt'
        self.identity = identity
        self._table: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self.path.is_file():
            try:
                data = torch.load(self.path, map_location='cpu', weights_only=True)
                if data.get('identity') == self.identity:
                    return dict(data['embeddings'])
            except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
                warnings.warn(f'text-embedding cache {self.path} is unreadable and will be rebuilt', stacklevel=3)
        return {}

    def lookup(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
        if self._table is None:
            self._table = self._load()
        found = {t: self._table[text_key(t)] for t in texts if text_key(t) in self._table}
        return found, [t for t in dict.fromkeys(texts) if t not in found]

    def store(self, new: dict[str, torch.Tensor]) -> None:
        table = self._load()                        # merge with what other runs may have added meanwhile
        table.update({text_key(t): v.detach().float().cpu() for t, v in new.items()})
        self._table = table
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f'.{self.path.name}.{os.getpid()}.tmp')
        torch.save({'identity': self.identity, 'embeddings': table}, tmp)
        tmp.replace(self.path)


class TextBank:
    r"""Frozen CLIP embeddings for arbitrary texts: from the cache, encoding (and caching) only what is missing.
    The CLIP model is built lazily, so a fully cached run never loads it."""

    def __init__(self, model: str, weights: str, cache_dir: str | Path | None = None, seed: int = 0):
        self.model, self.weights, self.seed = model, weights, seed
        self.identity = weights_identity(model, weights, seed)
        self.record = encoder_record(model, weights, self.identity)
        self.cache = EmbeddingCache(cache_dir or default_cache_dir(), self.identity)
        self.encoded = 0                            # texts actually run through CLIP by this bank
        self._encoder: ClipTextEncoder | None = None

    def embed(self, texts: list[str], labels: list[str] | None = None) -> torch.Tensor:
        r"""Embeddings [N, D] of `texts` (`labels[i]`: the class of texts[i], named if it must be truncated)."""
        found, missing = self.cache.lookup(texts)
        if missing:
            if self._encoder is None:
                self._encoder = ClipTextEncoder(self.model, self.weights, seed=self.seed)
            label_of = dict(zip(texts, labels or [''] * len(texts)))
            new = dict(zip(missing, self._encoder.encode(missing, labels=[label_of[t] for t in missing]).cpu()))
            self.encoded += len(missing)
            self.cache.store(new)
            found.update(new)
        return torch.stack([found[t] for t in texts]) if texts else torch.zeros(0)

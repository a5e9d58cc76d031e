r"""The medical text encoders behind `--clip biomedclip | pubmedclip`: building their towers, finding and reading
their weights, and their tokenizers. text/encoder.py's `ClipTextEncoder` uses them; nothing else should need to.

* **BiomedCLIP** (Zhang et al. 2023, hub `microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`): open_clip's
  `CustomTextCLIP` with a `transformers` PubMedBERT text model. Its text tower is built here from the configuration
  shipped in text/encoder_configs/biomedclip/ (so nothing is downloaded to build it), exactly as open_clip builds it
  from the hub's `open_clip_config.json` (`HFTextEncoder`: CLS token of the last hidden state, bias-free MLP
  projection 768 -> 640 -> 512). The weights are the `text.*` entries of the hub's `open_clip_pytorch_model.bin`
  (or `open_clip_model.safetensors`); the tokenizer is PubMedBERT's uncased WordPiece (`vocab.txt`, 256 tokens).
* **PubMedCLIP** (Eslami et al. 2023, hub `flaviagiammarino/pubmed-clip-vit-base-patch32`): OpenAI's CLIP ViT-B/32
  fine-tuned on ROCO, published in the `transformers` CLIPModel format. Its text model is OpenAI's text transformer
  (QuickGELU, 77 tokens, CLIP's BPE), so it is loaded into open_clip's ViT-B-32 text tower through
  `hf_clip_text_state`, a key mapping checked against `transformers` in tests/test_text_encoders.py.

`--clip-weights` for both: 'openai'/'hub' (download from the hub on first use; cached by huggingface_hub), a local
file or the downloaded hub folder, or 'none' (random weights; tests). BiomedCLIP with random weights tokenizes with
an offline stand-in vocabulary (`OFFLINE_VOCAB`), because PubMedBERT's vocabulary is part of the download: random
weights make the embeddings meaningless anyway, and the encoder's identity says which vocabulary was used.
"""
from __future__ import annotations

import json
import socket
import string
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from common.errors import UserError
from text.settings import PUBLISHED_WEIGHTS, TEXT_ENCODERS
CONFIG_DIR = Path(__file__).parent / 'encoder_configs'
BIOMEDBERT_REPO = 'microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract'      # BiomedCLIP's text model and vocabulary
#: The files a hub folder holds the weights in, preferred first.
WEIGHT_FILES = {'biomedclip': ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin'),
                'pubmedclip': ('model.safetensors', 'pytorch_model.bin')}
HUB_REPOS = {name: spec.hub for name, spec in TEXT_ENCODERS.items() if spec.family != 'openai'}
BIOMEDCLIP_REPO = HUB_REPOS['biomedclip']
VOCAB_FILE = 'vocab.txt'
#: BERT's special tokens, at the ids PubMedBERT's vocabulary gives them ([PAD] must be 0: open_clip's HFTextEncoder
#: masks every token equal to the config's pad_token_id).
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def offline_vocab() -> dict[str, int]:
    r"""The stand-in WordPiece vocabulary of BiomedCLIP with random weights: BERT's special tokens, then every
    printable ASCII character as a word start and as a continuation (`##x`). Any text tokenizes (character by
    character); ids stay far below the model's 30,522 embeddings."""
    chars = [c for c in string.printable if not c.isspace()]
    tokens = list(SPECIAL_TOKENS) + chars + [f'##{c}' for c in chars]
    return {t: i for i, t in enumerate(tokens)}


OFFLINE_VOCAB = 'offline-ascii-wordpiece'


# --- where the weights are --------------------------------------------------------------------------------------
def weight_file(name: str, weights: str) -> Path:
    r"""The local weight file of `--clip-weights PATH` for a medical encoder: the file itself, or in a folder (the
    downloaded hub repository) the first of `WEIGHT_FILES`."""
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    wanted = ' or '.join(WEIGHT_FILES[name])
    if path.is_dir():
        for candidate in WEIGHT_FILES[name]:
            if (path / candidate).is_file():
                return path / candidate
        raise UserError(f'--clip-weights {weights}: the folder holds no {wanted}; download them from the hub '
                        f'repository {HUB_REPOS[name]} into it (huggingface-cli download {HUB_REPOS[name]} '
                        f'--local-dir {weights})')
    raise UserError(f'--clip-weights {weights}: no such file or folder (expected openai/hub to download, none, or a '
                    f'local copy of {HUB_REPOS[name]}: its folder, or the file {wanted})')


def vocab_file(weights_path: Path) -> Path | None:
    r"""PubMedBERT's `vocab.txt` next to local BiomedCLIP weights (the hub folder), or None."""
    folder = weights_path if weights_path.is_dir() else weights_path.parent
    found = folder / VOCAB_FILE
    return found if found.is_file() else None


def hub_file(repo: str, filenames: tuple[str, ...], what: str) -> Path:
    r"""The first of `filenames` that the hub repository `repo` has, downloaded (or found in the local hub cache)."""
    from huggingface_hub import constants, hf_hub_download
    for filename in filenames:                       # the local hub cache first: no network, no retries
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached
            pass
    errors = []
    host = urlparse(constants.ENDPOINT).hostname or 'huggingface.co'
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:                           # offline: fail now, not after huggingface_hub's retries
        errors.append(f'{host} cannot be resolved: {err}')
    else:
        for filename in filenames:
            try:
                return Path(hf_hub_download(repo, filename))
            except Exception as err:  # noqa: BLE001 - any hub failure (offline, missing file) gets the same advice
                errors.append(f'{filename}: {type(err).__name__}: {(str(err).strip().splitlines() or [""])[0][:200]}')
    raise UserError(f'could not obtain {what} from the Hugging Face hub repository {repo} ({"; ".join(errors)}).\n'
                    f'  This machine is probably offline. On a connected machine run\n'
                    f'    huggingface-cli download {repo} --local-dir DIR\n'
                    f'  and pass --clip-weights DIR (the folder with {" or ".join(filenames)}).')


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    r"""A weight file: safetensors, or a torch pickle of tensors (a state dict, or one under 'state_dict')."""
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f'--clip-weights: cannot read {path} ({type(err).__name__}: {err})') from err
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'--clip-weights: {path} is not a state dict of tensors')
    return {k.removeprefix('module.'): v for k, v in state.items()}


# --- PubMedCLIP: transformers CLIPModel -> open_clip ------------------------------------------------------------
def hf_clip_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""The text half of a `transformers` CLIPModel (or CLIPTextModelWithProjection) state dict in open_clip's CLIP
    names. q/k/v projections are concatenated into `in_proj_*` (nn.MultiheadAttention's layout, q first);
    `text_projection.weight` (a Linear, y = W x) becomes open_clip's `text_projection` (x @ P, so P = W^T)."""
    out = {}
    prefix = 'text_model.'
    layers = sorted({int(k.split('.')[3]) for k in state if k.startswith(prefix + 'encoder.layers.')})
    if not layers or 'text_projection.weight' not in state:
        raise UserError('the weights are not a transformers CLIP model (no text_model.encoder.layers.* or '
                        'text_projection.weight)')
    renames = {'embeddings.token_embedding.weight': 'token_embedding.weight',
               'embeddings.position_embedding.weight': 'positional_embedding',
               'final_layer_norm.weight': 'ln_final.weight', 'final_layer_norm.bias': 'ln_final.bias'}
    for theirs, ours in renames.items():
        out[ours] = state[prefix + theirs]
    block = {'self_attn.out_proj': 'attn.out_proj', 'layer_norm1': 'ln_1', 'layer_norm2': 'ln_2',
             'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj'}
    for i in layers:
        src, dst = f'{prefix}encoder.layers.{i}.', f'transformer.resblocks.{i}.'
        for kind in ('weight', 'bias'):
            out[f'{dst}attn.in_proj_{kind}'] = torch.cat([state[f'{src}self_attn.{p}_proj.{kind}'] for p in 'qkv'])
            for theirs, ours in block.items():
                out[f'{dst}{ours}.{kind}'] = state[f'{src}{theirs}.{kind}']
    out['text_projection'] = state['text_projection.weight'].t().contiguous()
    if 'logit_scale' in state:
        out['logit_scale'] = state['logit_scale'].reshape(())
    return out


def check_hf_activation(weights_path: Path) -> None:
    r"""A `config.json` beside PubMedCLIP's weights must name QuickGELU, the activation open_clip is built with."""
    config = weights_path.parent / 'config.json'
    if not config.is_file():
        return
    try:
        text_config = json.loads(config.read_text()).get('text_config') or {}
    except (OSError, ValueError):
        return
    act = text_config.get('hidden_act', 'quick_gelu')
    if act != 'quick_gelu':
        raise UserError(f'{config}: the text model uses {act!r}; PubMedCLIP (OpenAI CLIP) uses quick_gelu, which is '
                        'what --clip pubmedclip builds')


def weights_path(name: str, weights: str) -> Path | None:
    r"""The weight file of a medical encoder: downloaded (or from the hub cache) for 'openai'/'hub', the local file
    for a path, None for random weights ('none')."""
    if weights == 'none':
        return None
    if weights in PUBLISHED_WEIGHTS:
        return hub_file(HUB_REPOS[name], WEIGHT_FILES[name], f'the {name} weights')
    return weight_file(name, weights)


def load_pubmedclip(clip: nn.Module, path: Path) -> None:
    r"""Fill open_clip's ViT-B-32 text tower (`clip`, visual tower removed) with PubMedCLIP's text weights."""
    check_hf_activation(path)
    mapped = hf_clip_text_state(read_state_dict(path))
    mapped.setdefault('logit_scale', clip.logit_scale.detach())     # a text-only export has none; embeddings ignore it
    _load_exactly(clip, mapped, path, 'PubMedCLIP')


# --- BiomedCLIP ---------------------------------------------------------------------------------------------------
def build_bert_tower() -> nn.Module:
    r"""BiomedCLIP's text tower (open_clip `HFTextEncoder`) from the shipped configuration, random weights, dropout
    off (a frozen tower is deterministic, as the CLIP towers, which have no dropout)."""
    from open_clip.hf_model import HFTextEncoder
    from transformers import BertConfig
    text_cfg = json.loads((CONFIG_DIR / 'biomedclip' / 'open_clip_config.json').read_text())['model_cfg']
    config = BertConfig.from_json_file(str(CONFIG_DIR / 'biomedclip' / 'config.json'))
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    tower = HFTextEncoder(BIOMEDBERT_REPO, output_dim=text_cfg['embed_dim'], config=config,
                          pooler_type=text_cfg['text_cfg']['hf_pooler_type'],
                          proj_type=text_cfg['text_cfg']['hf_proj_type'])
    tower.transformer.pooler = None          # CLS pooling of the last hidden state; BERT's own pooler is unused
    return tower


def load_biomedclip(tower: nn.Module, path: Path) -> None:
    r"""Fill the tower with the `text.*` weights of a BiomedCLIP open_clip checkpoint."""
    state = read_state_dict(path)
    text = {k[len('text.'):]: v for k, v in state.items() if k.startswith('text.')}
    if not text:
        raise UserError(f'--clip-weights: {path} holds no BiomedCLIP text tower (no text.* weights); expected '
                        f'{WEIGHT_FILES["biomedclip"][-1]} from {BIOMEDCLIP_REPO}')
    text.pop('transformer.embeddings.position_ids', None)     # a buffer older transformers releases saved
    _load_exactly(tower, text, path, 'BiomedCLIP')


def biomedclip_vocab(weights: str) -> Path | None:
    r"""PubMedBERT's vocab.txt for these weights: beside local weights, else from the hub (BiomedCLIP's repository,
    then PubMedBERT's); None for random weights (the offline stand-in)."""
    if weights == 'none':
        return None
    if weights not in PUBLISHED_WEIGHTS:
        found = vocab_file(weight_file('biomedclip', weights))
        if found is None:
            raise UserError(f'--clip-weights {weights}: BiomedCLIP needs PubMedBERT\'s {VOCAB_FILE} in the same '
                            f'folder as the weights; download it from the hub repository {BIOMEDCLIP_REPO} (or '
                            f'{BIOMEDBERT_REPO}) into that folder')
        return found
    try:
        return hub_file(BIOMEDCLIP_REPO, (VOCAB_FILE,), 'the PubMedBERT vocabulary')
    except UserError:
        return hub_file(BIOMEDBERT_REPO, (VOCAB_FILE,), 'the PubMedBERT vocabulary')


class WordPiece:
    r"""BERT's uncased WordPiece tokenizer (the `tokenizers` implementation `transformers`' BertTokenizerFast uses):
    [CLS] text [SEP], truncated to `context` tokens (keeping the final [SEP]), padded with [PAD] = 0."""

    def __init__(self, vocab: Path | None, context: int):
        from tokenizers import BertWordPieceTokenizer
        table = offline_vocab() if vocab is None else str(vocab)
        self.tokenizer = BertWordPieceTokenizer(table, lowercase=True)
        if self.tokenizer.token_to_id('[PAD]') != 0:
            raise UserError(f'{vocab}: [PAD] is not token 0, so this is not a BERT vocabulary BiomedCLIP can use')
        self.context = context
        self.sep = self.tokenizer.token_to_id('[SEP]')

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        r"""(tokens [N, context], the untruncated token count of each text)."""
        encoded = self.tokenizer.encode_batch(texts)
        tokens = torch.zeros(len(texts), self.context, dtype=torch.long)
        for row, enc in zip(tokens, encoded):
            ids = enc.ids if len(enc.ids) <= self.context else enc.ids[:self.context - 1] + [self.sep]
            row[:len(ids)] = torch.tensor(ids)
        return tokens, [len(e.ids) for e in encoded]


def _load_exactly(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = '; '.join(f'{label}: {", ".join(keys[:4])}{" ..." if len(keys) > 4 else ""}'
                           for label, keys in (('missing', missing), ('unexpected', unexpected),
                                               ('other shapes', sorted(shapes))) if keys)
        raise UserError(f'--clip-weights: {path} does not fit the {what} text tower ({detail})')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        module.load_state_dict(state, strict=True)

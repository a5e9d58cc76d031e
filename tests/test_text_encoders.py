r"""The medical text encoders (`--clip biomedclip | pubmedclip`, text/towers.py): offline builds, weight loading
checked against `transformers` itself, tokenization, identities, the cache, and one host trained with each."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from text import towers
from text.descriptions import load_descriptions
from text.encoder import ClipTextEncoder, TextBank, weights_identity


pytestmark = pytest.mark.filterwarnings('ignore:.*RANDOM weights:UserWarning')
TEXTS = ['A photo of the liver in abdominal CT.', 'A sessile polyp, a raised pink dome on the colon wall.', 'lung']


@pytest.fixture(scope='module')
def biomedclip():
    return ClipTextEncoder('biomedclip', 'none')


def tiny_clip_pair(hidden_act='quick_gelu'):
    r"""A tiny transformers CLIP text model with projection (float64) and the open_clip CLIP of the same shape."""
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=24, hidden_act=hidden_act)
    torch.manual_seed(0)
    hf = CLIPTextModelWithProjection(config).double().eval()
    ours = open_clip.model.CLIP(24, {'layers': 1, 'width': 64, 'head_width': 64, 'patch_size': 16, 'image_size': 32},
                                {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 4, 'layers': 2},
                                quick_gelu=True)
    del ours.visual
    return hf, ours.double().eval()


@pytest.mark.slow
def test_pubmedclip_key_mapping_reproduces_transformers_in_float64(tmp_path):
    r"""PubMedCLIP's weights are a transformers CLIPModel: after `hf_clip_text_state` (saved to disk and read back as
    a user's file would be) open_clip's text tower gives transformers' own text embedding, to float64 precision."""
    import open_clip
    hf, ours = tiny_clip_pair()
    hf.save_pretrained(tmp_path)                                   # model.safetensors + config.json
    path = towers.weight_file('pubmedclip', str(tmp_path))
    assert path.name == 'model.safetensors'
    state = {k: v.double() for k, v in towers.hf_clip_text_state(towers.read_state_dict(path)).items()}
    state['logit_scale'] = ours.logit_scale.detach()       # a text-only model has none; the text embedding ignores it
    ours.load_state_dict(state, strict=True)
    tokens = open_clip.get_tokenizer('ViT-B-32')(TEXTS)
    with torch.no_grad():
        expected = hf(input_ids=tokens).text_embeds
        got = ours.encode_text(tokens)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    perturbed = dict(state)                                        # the check can fail: q and k swapped
    perturbed['transformer.resblocks.0.attn.in_proj_weight'] = state['transformer.resblocks.0.attn.in_proj_weight'] \
        .roll(32, dims=0)
    ours.load_state_dict(perturbed)
    with torch.no_grad():
        assert not torch.allclose(ours.encode_text(tokens), expected, atol=1e-6)


@pytest.mark.slow
def test_pubmedclip_folder_loads_into_the_full_tower_and_refuses_another_activation(tmp_path):
    r"""A full-size transformers CLIP text model saved as a hub folder loads into `--clip pubmedclip` (strictly: every
    key, every shape) and embeds as transformers does; a config naming GELU is refused, as is a foreign file."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                            num_attention_heads=8, max_position_embeddings=77, projection_dim=512,
                            hidden_act='quick_gelu')
    torch.manual_seed(1)
    hf = CLIPTextModelWithProjection(config).eval()
    hf.save_pretrained(tmp_path)
    encoder = ClipTextEncoder('pubmedclip', str(tmp_path))
    tokens = encoder.tokenize(TEXTS)
    with torch.no_grad():
        expected = F.normalize(hf(input_ids=tokens).text_embeds, dim=-1)
    assert torch.allclose(encoder.encode(TEXTS), expected, atol=1e-5)
    assert encoder.identity == weights_identity('pubmedclip', str(tmp_path))
    assert encoder.identity.startswith(f'pubmedclip-file{encoder.record["weights_sha256_16"]}-quickgelu-open_clip')
    assert encoder.identity.endswith('-clip-bpe-ctx77')
    saved = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps(dict(saved, text_config={'hidden_act': 'gelu'})))
    with pytest.raises(UserError, match='quick_gelu'):
        ClipTextEncoder('pubmedclip', str(tmp_path))
    (tmp_path / 'other').mkdir()
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'other' / 'pytorch_model.bin')
    with pytest.raises(UserError, match='not a transformers CLIP model'):
        ClipTextEncoder('pubmedclip', str(tmp_path / 'other'))


def bert_reference(tower, tokens: torch.Tensor) -> torch.Tensor:
    r"""BiomedCLIP's text embedding re-derived from its parts: BERT over the full 256-token row with the padding
    masked, the [CLS] state, the bias-free MLP (Linear, GELU, Linear), L2-normalised."""
    hidden = tower.transformer(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state[:, 0]
    first, act, second = tower.proj
    assert isinstance(act, torch.nn.GELU) and first.bias is None and second.bias is None
    return F.normalize(second(act(first(hidden))), dim=-1)


@pytest.mark.slow
def test_biomedclip_builds_offline_and_embeds_as_its_parts(biomedclip):
    assert biomedclip.dim == 512 and biomedclip.context == 256
    assert biomedclip.identity == weights_identity('biomedclip', 'none')
    assert f'-{towers.OFFLINE_VOCAB}-ctx256' in biomedclip.identity
    tokens = biomedclip.tokenize(TEXTS)
    assert tokens.shape == (3, 256) and (tokens[:, 0] == 2).all()          # [CLS] first
    lengths = (tokens != 0).sum(1)
    assert (tokens[torch.arange(3), lengths - 1] == 3).all()                # [SEP] last, padding after
    with torch.no_grad():
        expected = bert_reference(biomedclip.clip, tokens)                  # full width, no column trimming
    assert torch.allclose(biomedclip.encode(TEXTS), expected, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)


@pytest.mark.slow
def test_biomedclip_lora_adapts_the_mlp_linears_of_every_layer(biomedclip):
    r"""`--text-lora` on BiomedCLIP targets BERT's MLP (intermediate.dense, output.dense) of each of the 12 layers,
    not the attention output (also named output.dense), as on the CLIP towers (mlp.c_fc, mlp.c_proj)."""
    import re

    from text.encoder import BERT_LORA_TARGETS
    hit = [n for n, _ in biomedclip.clip.transformer.named_modules() if re.fullmatch(BERT_LORA_TARGETS, n)]
    assert len(hit) == 24 and not any('attention' in n for n in hit)
    assert sorted({n.split('.', 3)[3] for n in hit}) == ['intermediate.dense', 'output.dense']


@pytest.mark.slow
def test_biomedclip_loads_a_local_hub_folder_with_its_vocabulary(tmp_path, biomedclip):
    r"""A BiomedCLIP checkpoint (open_clip names: text.* beside visual.*) and vocab.txt in one folder: the tower
    takes exactly the text weights, tokenizes with that vocabulary, and the identity names file and vocabulary."""
    # stored in half precision (half the bytes to write and read; loading casts to the tower's float32)
    state = {f'text.{k}': (v + 0.01).half() for k, v in biomedclip.clip.state_dict().items()}
    state['visual.trunk.cls_token'] = torch.zeros(1, 1, 768)
    state['logit_scale'] = torch.tensor(4.6)
    torch.save(state, tmp_path / 'open_clip_pytorch_model.bin')
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'liver', 'in', 'abdominal', 'ct', '.', 'a', 'photo',
             'of', 'polyp', '##s']
    (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    loaded = ClipTextEncoder('biomedclip', str(tmp_path))
    assert torch.equal(loaded.clip.proj[0].weight, state['text.proj.0.weight'].float())
    assert loaded.tokenize(['A photo of the liver in abdominal CT.'])[0, :12].tolist() == \
        [2, 11, 12, 13, 5, 6, 7, 8, 9, 10, 3, 0]                            # lower-cased words, [CLS] .. [SEP] [PAD]
    assert loaded.tokenize(['polyps'])[0, :4].tolist() == [2, 14, 15, 3]
    assert f'file{loaded.record["weights_sha256_16"]}' in loaded.identity and '-vocab' in loaded.identity
    assert loaded.identity != biomedclip.identity
    (tmp_path / 'vocab.txt').unlink()
    with pytest.raises(UserError, match='vocab.txt'):
        ClipTextEncoder('biomedclip', str(tmp_path))


@pytest.mark.parametrize('name', ['biomedclip', 'pubmedclip'])
def test_missing_weights_end_in_a_clear_message(tmp_path, name):
    with pytest.raises(UserError, match=f'no such file or folder.*{towers.HUB_REPOS[name]}'):
        ClipTextEncoder(name, str(tmp_path / 'nowhere'))
    with pytest.raises(UserError, match=f'holds no .*huggingface-cli download {towers.HUB_REPOS[name]}'):
        ClipTextEncoder(name, str(tmp_path))


def test_long_descriptions_are_truncated_with_a_warning_naming_the_class(biomedclip):
    long = ' '.join(['liver'] * 300)
    with pytest.warns(UserWarning, match=r'\(class liver\).*256 tokens'):
        tokens = biomedclip.tokenize(['short', long], labels=['spleen', 'liver'])
    assert tokens[1, -1] == 3 and (tokens[1] != 0).all()                    # cut to 256, ends with [SEP]


def captions(benchmark: str) -> list[str]:
    descriptions = load_descriptions(benchmark)
    return [c.caption for c in descriptions.classes] + [descriptions.background.caption]


@pytest.mark.slow
def test_biomedclip_embeds_the_shipped_descriptions_once_then_from_the_cache(tmp_path, biomedclip):
    texts = captions('synthetic-med')
    bank = TextBank('biomedclip', 'none', tmp_path)
    bank._encoder = biomedclip                                              # the module's build, not a second one
    first = bank.embed(texts)
    assert bank.encoded == len(texts) and first.shape == (len(texts), 512)
    again = TextBank('biomedclip', 'none', tmp_path)
    assert torch.equal(again.embed(texts), first) and again.encoded == 0 and again._encoder is None
    assert TextBank('pubmedclip', 'none', tmp_path).cache.path != bank.cache.path
    session = TextBank('biomedclip', 'none')          # the session's cache: the command lines below need no encoder
    session._encoder = biomedclip
    session.embed(captions('synthetic') + texts)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['biomedclip', 'pubmedclip'])
def test_patnet_with_each_medical_encoder_trains_and_tests_offline(datapath, tmp_path, name):
    r"""train.py then test.py with `--clip NAME --clip-weights none` on the synthetic pair; the checkpoint and
    results.json record the encoder."""
    import test as test_script
    import train
    from common.checkpoint import load_checkpoint
    from conftest import TINY_TRAIN
    argv = [a if a != 'hsnet' else 'patnet' for a in TINY_TRAIN]
    argv[argv.index('--episodes-per-epoch') + 1], argv[argv.index('--val-episodes') + 1] = '4', '2'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train.main(argv + ['--datapath', str(datapath), '--logpath', str(tmp_path), '--cdtg', '--clip', name,
                           '--clip-weights', 'none'])
        test_script.main(['--benchmark', 'synthetic-med', '--datapath', str(datapath), '--load',
                          str(tmp_path / 'best.pt'), '--episodes', '4', '--img-size', '64', '--workers', '0'])
    plugin = load_checkpoint(tmp_path / 'best.pt')['plugin']
    identity = weights_identity(name, 'none')
    assert plugin['text_encoder'] == identity and plugin['text_encoder_details']['name'] == name
    results = json.loads(next(tmp_path.glob('test-synthetic-med-*/results.json')).read_text())
    assert results['plugin']['text_encoder_details']['identity'] == identity
    assert results['conventions']['text_encoder'] == identity

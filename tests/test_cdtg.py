r"""The CD-TG plug-in: closed-form attention, fusion maths, identity at alpha = 1, augmentation, text cache, LoRA,
end-to-end runs and checkpoint/plug-in consistency."""
import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import test as test_cli
import train as train_cli
from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import UserError
from engine.factory import build_model, load_model
from conftest import TINY_TRAIN
from model.base import EpisodeContext
from model.layers import resize_mask
from text.encoder import EmbeddingCache, TextBank, text_key
from text.plugin import CDTG, CDTGConfig, MedicalStyle, TextAlign

ROOT = Path(__file__).resolve().parents[1]
CDTG_FLAGS = ['--cdtg', '--clip', 'ViT-B-32', '--clip-weights', 'none']
# the other CLI runs use a 64-d shared alignment space (a small plug-in, fast tiny runs); cdtg_run keeps the default
SMALL = CDTG_FLAGS + ['--cdtg-width', '64']


def cdtg_config(**kw):
    base = dict(method='hsnet', backbone='resnet50', cdtg=True, clip='ViT-B-32', clip_weights='none',
                cdtg_attn='paper', alpha=0.7, fusion='fixed', no_style_aug=False, text_lora=0, seed=0)
    base.update(kw)
    return base


def test_closed_form_attention_equals_multihead_attention_with_repeated_keys():
    torch.manual_seed(0)
    c, d, n, h, w = 16, 12, 2, 3, 5
    align = TextAlign(d, c, 'paper', bias='template').double()    # the reference's form
    mha = nn.MultiheadAttention(c, 8).double()                   # sequence-first, as the reference
    with torch.no_grad():
        mha.in_proj_weight[2 * c:] = align.value.weight          # W_q, W_k stay random: they cannot matter
        mha.in_proj_bias[2 * c:] = align.value.bias
        mha.out_proj.weight.copy_(align.out.weight)
        mha.out_proj.bias.copy_(align.out.bias)
    feat = torch.randn(n, c, h, w, dtype=torch.float64)
    text = torch.randn(n, d, dtype=torch.float64)
    # reference AttentionModule: text = MLP(text) repeated at every pixel; LN(MHA(pixels, text, text) + pixels)
    pixels = feat.flatten(2).permute(2, 0, 1)                                   # [hw,N,C]
    t = align.mlp(align.proj(text)).unsqueeze(0).expand(h * w, -1, -1)          # [hw,N,C]
    ref = align.norm(mha(pixels, t, t)[0] + pixels).permute(1, 2, 0).reshape(n, c, h, w)
    out = align(feat, text[:, None])
    assert torch.allclose(out, ref, atol=1e-10)


def test_attribute_attention_uses_every_sentence_and_respects_the_mask():
    torch.manual_seed(0)
    align = TextAlign(8, 16, 'attributes').eval()
    feat = torch.randn(2, 16, 3, 3)
    text = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = align(feat, text, mask)
    changed = text.clone()
    changed[0, 3] = 100                                          # a padded sentence: no effect
    assert torch.allclose(align(feat, changed, mask), out)
    changed[0, 1] = 100                                          # a real sentence: changes episode 0 only
    moved = align(feat, changed, mask)
    assert not torch.allclose(moved[0], out[0]) and torch.allclose(moved[1], out[1])
    # non-degenerate: pixels attend differently (output is not LN(F + one shared vector))
    diff = moved[0] - out[0]
    assert diff.flatten(1).std(dim=1).mean() > 1e-3


class _Bound(CDTG):
    r"""CDTG with a fixed random text table instead of CLIP (maths tests only)."""

    def __init__(self, channels, levels, point, cfg, n_classes=3, t=1, d=512):
        super().__init__(channels, levels, point, cfg)
        g = torch.Generator().manual_seed(0)
        self.register_buffer('text_table', torch.randn(n_classes + 1, t, d, generator=g), persistent=False)
        self.register_buffer('text_mask', torch.ones(n_classes + 1, t, dtype=torch.bool), persistent=False)
        self.benchmark, self.class_names = 'fake', [f'c{i}' for i in range(n_classes)]


@pytest.mark.parametrize('n_protos, per_episode, with_bg, bias', [(1, False, True, 'bounded'),
                                                               (3, False, True, 'template'),
                                                               (3, True, True, 'bounded'), (1, True, False, 'bounded')])
def test_prototype_fusion_maths_float64(n_protos, per_episode, with_bg, bias):
    r"""Prototype sets [N,P,C]: per support (N = B*K, PATNet) or already averaged over shots (N = B, Q-Net/IFA),
    P >= 1 prototypes per set (PMMs' mixtures), no background set (Q-Net): every prototype of a set moves towards
    the same text prototype, FP_p <- 0.7 FP_p + 0.3 FP_t, with FP_t averaged over the shots for per-episode sets;
    each text encoded as its row of the whole table (bounded: less what the rows share)."""
    torch.manual_seed(0)
    cfg = CDTGConfig(clip_weights='none', alpha=0.7, style_aug=False, text_bias=bias)
    plugin = _Bound([8, 8, 16], [2, 2, 3], 'prototypes', cfg).double().eval()
    b, k = 2, 2
    feats = [torch.randn(b * k, 8, 6, 6, dtype=torch.float64), torch.randn(b * k, 8, 6, 6, dtype=torch.float64),
             torch.randn(b * k, 16, 3, 3, dtype=torch.float64)]
    masks = (torch.rand(b * k, 24, 24) > 0.5).double()
    ctx = EpisodeContext(class_id=torch.tensor([2, 0]), nshot=k, support_masks=masks)
    n = b if per_episode else b * k
    fg = [torch.randn(n, n_protos, f.shape[1], dtype=torch.float64) for f in feats]
    bg = [torch.randn(n, n_protos, f.shape[1], dtype=torch.float64) if with_bg else None for f in feats]
    new_fg, new_bg = plugin.prototypes(fg, bg, feats, ctx)
    for i, f in enumerate(feats):
        level = plugin.tap_level[i]
        align = plugin.align[level]
        table = align.encode_table(plugin.text_table, plugin.text_mask)
        cls_text = table[[2, 2, 0, 0]]                            # supports follow their episode's class
        bg_text = table[[3, 3, 3, 3]]                             # last row = background
        m = resize_mask(masks, f.shape[-2:], torch.float64)      # [B*K,1,h,w], interpolated and summed in float64
        # MAP with the reference plug-in's epsilon (generate_prototype: Σ F·m / (Σ m + 1e-6)), as PATNet's
        fp_t = (align(f, None, encoded=cls_text) * m).sum((2, 3)) / (m.sum((2, 3)) + 1e-6)          # [B*K,C]
        bp_t = (align(f, None, encoded=bg_text) * (1 - m)).sum((2, 3)) / ((1 - m).sum((2, 3)) + 1e-6)
        if per_episode:
            fp_t, bp_t = (0.5 * (t[0::2] + t[1::2]) for t in (fp_t, bp_t))   # mean of each episode's 2 shots
        assert new_fg[i].shape == fg[i].shape
        for j in range(n_protos):
            assert torch.allclose(new_fg[i][:, j], 0.7 * fg[i][:, j] + 0.3 * fp_t, atol=1e-12)
            if with_bg:
                assert torch.allclose(new_bg[i][:, j], 0.7 * bg[i][:, j] + 0.3 * bp_t, atol=1e-12)
        if not with_bg:
            assert new_bg[i] is None
    assert plugin.tap_level == [0, 0, 1] and len(plugin.align) == 2


def _pool_aligned_map(align, feat, texts, weights, eps=1e-6):
    r"""The definition `TextAlign.pooled` computes in closed form: MAP of the explicit aligned map, one per text."""
    return [(align(feat, t) * w[:, None]).sum((2, 3)) / (w.sum((1, 2))[:, None] + eps) for t, w in zip(texts, weights)]


@pytest.mark.parametrize('bias', ['bounded', 'template'])
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_pooled_alignment_closed_form_equals_pooling_the_aligned_map(dtype, tol, bias):
    r"""TextAlign.pooled (the paper mode's MAP of LayerNorm(F + u) from F's moments, never forming the map) against
    MAP of the full aligned map in float64; backbone-like features (ReLU outputs, large mean), trained-looking
    LayerNorm affine parameters, a soft (resized) mask and its complement; both text biases (the bounded u_p scales
    with each pixel's σ_p)."""
    torch.manual_seed(0)
    align = TextAlign(12, 64, bias=bias, ratio=0.6).double()
    with torch.no_grad():
        align.norm.weight.normal_(1, 0.3)
        align.norm.bias.normal_(0, 0.3)
    feat = torch.relu(torch.randn(3, 64, 25, 25, dtype=torch.float64) * 2 + 1.5)
    texts = [torch.randn(3, 2, 12, dtype=torch.float64), torch.randn(3, 1, 12, dtype=torch.float64)]
    m = resize_mask((torch.rand(3, 100, 100) > 0.6).double(), (25, 25))[:, 0].double()
    want = _pool_aligned_map(align, feat, texts, (m, 1 - m))
    got = align.to(dtype).pooled(feat.to(dtype), [t.to(dtype) for t in texts], [m.to(dtype), (1 - m).to(dtype)], 1e-6)
    assert len(got) == 2
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert ((g.double() - w).norm() / w.norm()).item() < tol


def test_pixel_moments_match_float64_on_channels_last_relu_maps():
    from text.plugin import _pixel_moments
    torch.manual_seed(0)
    f = torch.relu(torch.randn(2, 300, 40) * 2 + 0.5).transpose(1, 2)           # [N,C,L] stored channels-last
    f[0, :, 7] = 3.7                                                             # a constant pixel
    var, mean = _pixel_moments(f)
    var64, mean64 = torch.var_mean(f.double(), dim=1, correction=0, keepdim=True)
    assert var.shape == mean.shape == (2, 1, 300) and (var >= 0).all()
    assert torch.allclose(mean.double(), mean64, rtol=1e-6, atol=1e-7)
    assert torch.allclose(var.double(), var64, rtol=1e-5, atol=1e-5 * var64.mean().item())


@pytest.mark.parametrize('bias', ['bounded', 'template'])
def test_pooled_alignment_closed_form_has_the_gradient_of_the_aligned_map(bias):
    r"""A host that trains the layers below its prototypes (PMMs' fuse layer) back-propagates through `pooled`:
    the gradients w.r.t. the features, the weights and the alignment's parameters (the bounded ratio s included)
    equal those of pooling the explicit aligned map (float64), the moments' terms included."""
    torch.manual_seed(0)
    align = TextAlign(6, 16, bias=bias).double()
    with torch.no_grad():
        align.norm.weight.normal_(1, 0.3)
    feat = torch.relu(torch.randn(2, 16, 5, 5, dtype=torch.float64) + 1)
    texts = [torch.randn(2, 1, 6, dtype=torch.float64), torch.randn(2, 1, 6, dtype=torch.float64)]
    m = torch.rand(2, 5, 5, dtype=torch.float64)
    probe = torch.randn(2, 2, 16, dtype=torch.float64)              # a loss that is not invariant to the norm

    def grads(pool):
        f, w = feat.clone().requires_grad_(), m.clone().requires_grad_()
        align.zero_grad()
        out = torch.stack(pool(f, w), dim=1)
        (out * probe).sum().backward()
        return [f.grad, w.grad] + [p.grad.clone() for p in align.parameters() if p.grad is not None]

    got = grads(lambda f, w: align.pooled(f, texts, [w, 1 - w], 1e-6))
    want = grads(lambda f, w: _pool_aligned_map(align, f, texts, (w, 1 - w)))
    assert len(got) == len(want) > 2
    for g, e in zip(got, want):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_text_encodings_are_reused_only_while_nothing_changes():
    torch.manual_seed(0)
    plugin = _Bound([8, 16], [2, 3], 'prototypes', CDTGConfig(clip_weights='none', style_aug=False)).eval()
    align = plugin.align[1]
    with torch.no_grad():
        first = plugin._table_encoding(1)
        assert plugin._table_encoding(1) is first                               # reused across calls
        assert torch.equal(first, align.encode_table(plugin.text_table, plugin.text_mask))
        align.value.weight.add_(0.5)                                            # as an optimizer step: in place
        second = plugin._table_encoding(1)
        assert not torch.allclose(second, first)
        assert torch.equal(second, align.encode_table(plugin.text_table, plugin.text_mask))
        plugin.double()                                                         # converted: recomputed
        assert plugin._table_encoding(1).dtype == torch.float64
        plugin._table_encoding(1)
        plugin.bind_texts('other', ['a', 'b', 'c'], [['x'], ['y'], ['z']], ['w'])
        assert plugin._encodings == {}                                          # rebound: forgotten
    plugin.register_buffer('text_table', torch.randn(4, 1, 512, dtype=torch.float64), persistent=False)
    graph = plugin._table_encoding(1)                                           # autograd: never stored
    assert graph.requires_grad and plugin._table_encoding(1) is not graph
    graph.sum().backward()
    assert align.value.weight.grad is not None


def test_learned_fusion_gate():
    cfg = CDTGConfig(clip_weights='none', alpha=0.7, fusion='learned', style_aug=False)
    plugin = _Bound([8], [2], 'prototypes', cfg)
    assert torch.allclose(plugin.image_weight(0), torch.tensor(0.7))
    feats = [torch.randn(2, 8, 4, 4)]
    ctx = EpisodeContext(torch.tensor([0, 1]), 1, (torch.rand(2, 16, 16) > 0.5).float())
    fg, bg = plugin.prototypes([torch.randn(2, 8)], [torch.randn(2, 8)], feats, ctx)
    (fg[0].sum() + bg[0].sum()).backward()
    assert plugin.alpha_logit.grad is not None and plugin.alpha_logit.grad.abs().sum() > 0
    with pytest.raises(UserError):
        CDTGConfig(alpha=1.0, fusion='learned').validate()
    with pytest.raises(UserError):
        CDTGConfig(alpha=1.5).validate()


def test_medical_style_augmentation():
    torch.manual_seed(0)
    aug = MedicalStyle(0.3)
    feat = torch.randn(2, 4, 6, 6) * 3 + 1
    aug.eval()
    assert aug([feat])[0] is feat                                 # inactive outside training
    aug.train()
    for kind in MedicalStyle.KINDS:
        style = aug.style(feat, kind)
        out = aug.adain(feat, style)
        # AdaIN: the output carries the style's per-channel mean and (unbiased) std
        assert torch.allclose(out.mean((2, 3)), style.mean((2, 3)), atol=1e-4)
        assert torch.allclose(out.std((2, 3)), style.std((2, 3)), rtol=1e-3, atol=1e-4)
    assert torch.equal(aug.style(feat, 'contrast'), torch.relu(1.3 * feat))
    low = aug.style(feat, 'low_contrast')
    assert torch.allclose(low - low.mean((2, 3), keepdim=True), 0.3 * (feat - feat.mean((2, 3), keepdim=True)),
                          atol=1e-5)
    assert not torch.equal(aug.style(feat, 'boundary'), aug.style(feat, 'boundary'))   # fresh random kernel


@pytest.mark.parametrize('model', ['ViT-B-32', 'RN50'])
@pytest.mark.slow
def test_trimmed_text_encoding_equals_open_clip(model):
    from text.encoder import ClipTextEncoder
    enc = ClipTextEncoder(model, 'none')
    tokens = enc.tokenize(['A photo of a lung.', 'A photo of a nevus, a benign mole with a regular pigment network.'])
    with torch.no_grad():
        full = torch.nn.functional.normalize(enc.clip.encode_text(tokens), dim=-1)
        assert torch.allclose(enc(tokens), full, atol=1e-5)
        assert enc(tokens).shape == (2, enc.dim) and enc.dim == (1024 if model == 'RN50' else 512)


@pytest.mark.slow
def test_embedding_cache_hit_miss_and_invalidation(tmp_path):
    bank = TextBank('ViT-B-32', 'none', tmp_path)
    a = bank.embed(['A photo of a lung.', 'A photo of a liver.'])
    assert bank.encoded == 2 and a.shape == (2, 512)
    assert torch.allclose(a.norm(dim=1), torch.ones(2), atol=1e-5)
    again = TextBank('ViT-B-32', 'none', tmp_path)                # a new run: everything from disk
    assert torch.equal(again.embed(['A photo of a liver.', 'A photo of a lung.']), a.flip(0))
    assert again.encoded == 0 and again._encoder is None          # CLIP never built
    changed = again.embed(['A photo of a lung.', 'A photo of a dark liver.'])       # one description edited
    assert again.encoded == 1 and torch.equal(changed[0], a[0]) and not torch.allclose(changed[1], a[1])
    other = EmbeddingCache(tmp_path, 'ViT-B-32-openai')          # another encoder identity shares nothing
    assert other.lookup(['A photo of a lung.'])[1] == ['A photo of a lung.']
    assert text_key('x') != text_key('x ')


@pytest.mark.slow
def test_alpha_one_is_an_exact_identity_for_hsnet(datapath):
    torch.manual_seed(0)
    plain = build_model({'method': 'hsnet', 'backbone': 'resnet50'}, 'none').eval()
    guided = build_model(cdtg_config(alpha=1.0), None).eval()
    guided.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        guided.hooks.gate.fill_(0.8)                              # an open gate: only alpha keeps it exact
    from data import build_dataset
    ds = build_dataset('synthetic-med', datapath, 'test', 2, 64)
    guided.hooks.bind(ds.name, ds.class_names)
    batch = ds[ds.sample_episodes(1, 0)[0]]
    args = (batch['query_img'][None], batch['support_imgs'][None], batch['support_masks'][None].float(),
            batch['class_id'][None])
    with torch.no_grad():
        assert torch.equal(plain(*args).logits, guided(*args).logits)
        guided.hooks.config.alpha = 0.5
        assert not torch.allclose(plain(*args).logits, guided(*args).logits)


def test_methods_never_import_text():
    for path in (ROOT / 'model').rglob('*.py'):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == 'text' or n.startswith('text.') for n in names), path


def test_unknown_benchmark_descriptions_are_a_clear_error():
    plugin = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none'))
    with pytest.raises(UserError):
        plugin.bind('no-such-benchmark', ['a'])


@pytest.fixture(scope='module')
def cdtg_run(datapath, tmp_path_factory):
    logpath = tmp_path_factory.mktemp('cdtg_run')
    train_cli.main(TINY_TRAIN + CDTG_FLAGS + ['--datapath', str(datapath), '--logpath', str(logpath)])
    return logpath / 'best.pt'


@pytest.mark.slow
def test_hsnet_cdtg_train_and_test(cdtg_run, datapath, tmp_path):
    ckpt = load_checkpoint(cdtg_run)
    assert ckpt['plugin']['name'] == 'cdtg' and ckpt['plugin']['text_encoder'].startswith('ViT-B-32-random')
    assert any(k.startswith('hooks.align.') for k in ckpt['model'])
    common = ['--load', str(cdtg_run), '--benchmark', 'synthetic-med', '--datapath', str(datapath), '--episodes', '4',
              '--workers', '0', '--cdtg']
    res = test_cli.main(common + ['--logpath', str(tmp_path / 'a')])
    assert res['plugin']['config']['alpha'] == 0.7
    assert res['conventions']['text_encoder'] == res['plugin']['text_encoder']
    assert 'project extension' in res['conventions']['cdtg_reading']['maps']
    # on HSNet alpha only rescales the learned gate: an override is refused, not run off-distribution
    with pytest.raises(UserError, match='no image-weight meaning'):
        test_cli.main(common + ['--logpath', str(tmp_path / 'b'), '--alpha', '0.2'])


@pytest.mark.slow
def test_plugin_mismatch_errors(cdtg_run, tiny_checkpoint, datapath, tmp_path):
    args = ['--benchmark', 'synthetic-med', '--datapath', str(datapath), '--episodes', '2', '--workers', '0']
    with pytest.raises(UserError, match='without the CD-TG plug-in'):
        test_cli.main(['--load', str(tiny_checkpoint), '--cdtg'] + args)
    with pytest.raises(UserError, match='CD-TG checkpoints only'):
        test_cli.main(['--load', str(tiny_checkpoint), '--alpha', '0.5'] + args)
    ckpt = load_checkpoint(cdtg_run)
    plain_config = dict(ckpt['config'], cdtg=False)              # plug-in weights into a plain model
    save_checkpoint(dict(ckpt, config=plain_config), tmp_path / 'mixed.pt')
    with pytest.raises(UserError, match='plug-in weights'):
        test_cli.main(['--load', str(tmp_path / 'mixed.pt')] + args)
    state = {k: v for k, v in ckpt['model'].items() if not k.startswith('hooks.')}   # plain weights, plug-in config
    save_checkpoint(dict(ckpt, model=state), tmp_path / 'stripped.pt')
    with pytest.raises(UserError, match='does not fit method hsnet with backbone resnet50 \\+ CD-TG'):
        load_model(str(tmp_path / 'stripped.pt'), torch.device('cpu'))


@pytest.mark.slow
def test_attribute_attention_learned_fusion_no_style_run(datapath, tmp_path):
    run = tmp_path / 'run'
    extra = ['--cdtg-attn', 'attributes', '--fusion', 'learned', '--no-style-aug']
    train_cli.main(TINY_TRAIN + SMALL + extra + ['--datapath', str(datapath), '--logpath', str(run)])
    ckpt = load_checkpoint(run / 'best.pt')
    cfg = ckpt['plugin']['config']
    assert cfg['attn'] == 'attributes' and cfg['fusion'] == 'learned' and cfg['style_aug'] is False
    assert any(k.endswith('alpha_logit') for k in ckpt['model']) and any('.attn.' in k for k in ckpt['model'])
    res = test_cli.main(['--load', str(run / 'best.pt'), '--benchmark', 'synthetic-med', '--datapath', str(datapath),
                         '--episodes', '2', '--workers', '0', '--logpath', str(tmp_path / 'test')])
    assert json.loads((tmp_path / 'test' / 'results.json').read_text())['plugin']['config'] == cfg
    assert 0 <= res['miou'] <= 100
    with pytest.raises(UserError, match='learned'):
        test_cli.main(['--load', str(run / 'best.pt'), '--benchmark', 'synthetic-med', '--datapath', str(datapath),
                       '--episodes', '2', '--workers', '0', '--alpha', '0.5', '--logpath', str(tmp_path / 'x')])


def test_style_augmentation_switch():
    on = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none'))
    off = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none', style_aug=False))
    assert isinstance(on.style, MedicalStyle) and off.style is None
    feats = [torch.randn(2, 8, 4, 4)]
    ctx = EpisodeContext(torch.tensor([0]), 2, torch.ones(2, 16, 16))
    on.train()
    off.train()
    assert not torch.equal(on.support_features(feats, ctx)[0], feats[0])
    assert off.support_features(feats, ctx)[0] is feats[0]
    on.eval()
    assert on.support_features(feats, ctx)[0] is feats[0]


@pytest.mark.slow
def test_text_lora_trains_and_is_saved(datapath, tmp_path):
    torch.manual_seed(0)
    model = build_model(cdtg_config(text_lora=4), 'none')
    from data import build_dataset
    ds = build_dataset('synthetic', datapath, 'trn', 1, 64)
    model.hooks.bind(ds.name, ds.class_names)
    lora = {n: p for n, p in model.named_parameters() if 'lora_' in n}
    assert lora and all(p.requires_grad for p in lora.values())
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    held = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert all(id(p) in held for p in lora.values())
    with torch.no_grad():
        model.hooks.gate.fill_(1.0)                               # let the text reach the output
    before = {n: p.detach().clone() for n, p in lora.items()}
    batch = ds[ds.sample_episodes(1, 0)[0]]
    model.train()
    output = model(batch['query_img'][None], batch['support_imgs'][None], batch['support_masks'][None].float(),
                   batch['class_id'][None])
    model.loss(output, {'query_mask': batch['query_mask'][None]})['ce'].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if 'lora_B' in n)
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in lora.items())
    state = model.state_dict()
    assert any('lora_' in k for k in state) and not any('text_encoder.clip.token_embedding' in k for k in state)
    reloaded = build_model(cdtg_config(text_lora=4), 'none')
    reloaded.load_state_dict(state)                               # strict: base CLIP weights are not "missing"
    for n, p in reloaded.named_parameters():
        if 'lora_' in n:
            assert torch.equal(p, dict(model.named_parameters())[n])


@pytest.mark.slow
def test_text_lora_cli_run(datapath, tmp_path):
    run = tmp_path / 'lora'
    train_cli.main(TINY_TRAIN + SMALL + ['--text-lora', '8', '--datapath', str(datapath), '--logpath', str(run)])
    ckpt = load_checkpoint(run / 'best.pt')
    assert ckpt['plugin']['config']['text_lora'] == 8 and any('lora_' in k for k in ckpt['model'])
    res = test_cli.main(['--load', str(run / 'best.pt'), '--benchmark', 'synthetic-med', '--datapath', str(datapath),
                         '--episodes', '2', '--workers', '0', '--logpath', str(tmp_path / 't')])
    assert res['plugin']['config']['text_lora'] == 8


@pytest.mark.slow
def test_encode_text_script_fills_the_cache_used_by_the_plugin(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location('encode_text', ROOT / 'scripts' / 'encode_text.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ['--benchmark', 'wbc', '--clip-weights', 'none', '--text-cache', str(tmp_path)]
    first = script.main(args)
    assert first['encoded'] == first['texts'] > 8                 # captions + attributes + background
    assert script.main(args)['encoded'] == 0
    for attn in ('paper', 'attributes'):
        plugin = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none', attn=attn, text_cache=str(tmp_path)))
        plugin.bind('wbc', ['nucleus', 'cytoplasm'])
        assert plugin.bank.encoded == 0 and plugin.bank._encoder is None


@pytest.mark.slow
def test_patnet_cdtg_on_synthetic_and_a_medical_fixture(datapath, tmp_path):
    from fixtures_targets import write_wbc
    run = tmp_path / 'patnet'
    train_cli.main(TINY_TRAIN + ['--method', 'patnet'] + SMALL
                   + ['--datapath', str(datapath), '--logpath', str(run)])
    ckpt = load_checkpoint(run / 'best.pt')
    assert ckpt['config']['method'] == 'patnet' and ckpt['plugin']['name'] == 'cdtg'
    res = test_cli.main(['--load', str(run / 'best.pt'), '--benchmark', 'synthetic-med', '--datapath', str(datapath),
                         '--episodes', '2', '--workers', '0', '--logpath', str(tmp_path / 'med')])
    assert res['method'] == 'patnet' and res['plugin']['config']['alpha'] == 0.7
    write_wbc(tmp_path / 'data')
    res = test_cli.main(['--load', str(run / 'best.pt'), '--benchmark', 'wbc', '--datapath', str(tmp_path / 'data'),
                         '--nshot', '2', '--episodes', '4', '--workers', '0', '--logpath', str(tmp_path / 'wbc'),
                         '--alpha', '0.2'])                      # a prototype host: alpha is the image weight
    assert set(res['per_class']) == {'nucleus', 'cytoplasm'} and res['nshot'] == 2
    assert res['plugin']['config']['alpha'] == 0.2


def test_offline_clip_weights_give_a_clear_error(monkeypatch):
    import open_clip

    from text.encoder import ClipTextEncoder

    def offline(*args, **kwargs):
        raise RuntimeError('Failed to download weights: no internet')
    monkeypatch.setattr(open_clip, 'create_model', offline)
    with pytest.raises(UserError) as err:
        ClipTextEncoder('ViT-B-16', 'openai')
    msg = str(err.value)
    assert 'timm/vit_base_patch16_clip_224.openai' in msg and '--clip-weights' in msg
    with pytest.raises(UserError, match='no such file'):
        ClipTextEncoder('ViT-B-16', '/nonexistent/clip.bin')
    with pytest.raises(UserError, match='--clip'):
        ClipTextEncoder('ViT-L-14', 'none')


# --- CLIP activation and encoder identity ------------------------------------------------------------------------
@pytest.mark.slow
def test_openai_and_file_weights_embed_identically_with_quick_gelu(tmp_path, monkeypatch):
    r"""The same (random) weights given as a local file and through the 'openai' path (open_clip's hub download
    replaced by that file) build QuickGELU text towers with identical embeddings; open_clip >= 2.29 builds plain
    GELU for pretrained='openai' unless told otherwise. The identity (cache key, checkpoint record) names the
    activation and open_clip's major version, and the same weights under GELU embed differently."""
    import open_clip

    from text.encoder import ClipTextEncoder, open_clip_major, text_activation, weights_identity
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        full = open_clip.create_model('RN50', pretrained=None, force_quick_gelu=True)
    # (RN50: the smallest image tower.) The image tower is never used: store it as one shared zero (stride-0
    # views) and keep the text tower's weights
    state = {k: torch.zeros(()).expand(v.shape) if k.startswith('visual.') else v.half()
             for k, v in full.state_dict().items()}
    del full
    path = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(state, path)
    monkeypatch.setattr(open_clip.factory, 'download_pretrained', lambda cfg, **kw: str(path))
    from_file, from_hub = ClipTextEncoder('RN50', str(path)), ClipTextEncoder('RN50', 'openai')
    assert text_activation(from_file.clip) == text_activation(from_hub.clip) == 'quickgelu'
    tokens = from_file.tokenize(['A photo of a lung.', 'A photo of the liver in which it appears as a large organ.'])
    with torch.no_grad():
        embedded = from_file(tokens)
        assert torch.equal(embedded, from_hub(tokens))
        for block in from_hub.clip.transformer.resblocks:            # what open_clip >= 2.29 builds for 'openai'
            block.mlp.gelu = nn.GELU()
        assert text_activation(from_hub.clip) == 'gelu'
        assert not torch.allclose(from_hub(tokens), embedded, atol=1e-4)
    assert from_hub.identity == f'RN50-openai-quickgelu-open_clip{open_clip_major()}'
    gelu = weights_identity('RN50', str(path), activation='gelu')
    assert gelu != from_file.identity and gelu.replace('-gelu-', '-quickgelu-') == from_file.identity
    assert EmbeddingCache(tmp_path, gelu).path != EmbeddingCache(tmp_path, from_file.identity).path


@pytest.mark.slow
def test_stale_caches_are_reencoded_and_old_checkpoints_refused(tmp_path):
    r"""A cache written under an identity without the activation (before this fix) is not used; a checkpoint
    recorded with such an identity is refused with the reason."""
    from text.encoder import weights_identity
    text = 'A photo of a lung.'
    EmbeddingCache(tmp_path, 'ViT-B-32-random-seed0-open_clip3.3.0').store({text: torch.full((512,), 9.0)})
    bank = TextBank('ViT-B-32', 'none', tmp_path)
    emb = bank.embed([text])
    assert bank.encoded == 1 and not torch.equal(emb[0], torch.full((512,), 9.0))
    plugin = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none', text_cache=str(tmp_path)))
    assert plugin.identity == weights_identity('ViT-B-32', 'none') and 'quickgelu' in plugin.identity
    with pytest.raises(UserError, match='activation'):
        plugin.check_record({'text_encoder': 'ViT-B-32-openai'}, 'old.pt')
    plugin.check_record(plugin.record(), 'same.pt')

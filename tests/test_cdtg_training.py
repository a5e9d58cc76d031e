r"""CD-TG stays text guidance while it trains: its own optimiser group (Adam and SGD hosts, PMMs' groups), the
bounded text bias, the identity-start gated fusion, the text controls, the health readings and the no-harm report."""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train as train_cli
from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import UserError
from engine.factory import build_model, load_model
from engine.health import HealthLog
from engine.loops import clip_gradients
from model.base import EpisodeContext
from model.layers import resized_masks
from text.settings import LR_SCALES, MAX_TEXT_RATIO, CDTGPlugin
from text.plugin import ALIKE_COS, ALIKE_STEPS, CDTG, CDTGConfig, TextAlign

ROOT = Path(__file__).resolve().parents[1]
CDTG_FLAGS = ['--cdtg', '--clip', 'ViT-B-32', '--clip-weights', 'none']


def config(method: str, **kw) -> dict:
    r"""A run configuration as train.py writes it (bounded text bias, the plug-in's own group)."""
    base = dict(method=method, backbone='resnet50', cdtg=True, clip='ViT-B-32', clip_weights='none',
                cdtg_attn='paper', alpha=0.7, fusion='fixed', no_style_aug=False, text_lora=0, seed=0,
                cdtg_text_bias='bounded', cdtg_text_ratio=0.3, cdtg_text='descriptions', cdtg_lr_scale=None,
                cdtg_weight_decay=0.01, cdtg_grad_clip=1.0)
    base.update(kw)
    return base


def quiet_model(cfg: dict, weights='none'):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return build_model(cfg, weights)


# --- the text bias ------------------------------------------------------------------------------------------------
def test_bounded_text_bias_by_hand_float64():
    r"""bounded: LayerNorm(F_p + s·σ_p·û), û the unit-RMS direction of u less its channel mean, σ_p = sqrt(var_c F_p +
    ε), s = sigmoid share; the text layers carry no bias (the text is the only source of u: a zero text gives no u),
    and ||u_p - mean|| / ||F_p - mean|| = s at every pixel whatever the weights."""
    torch.manual_seed(0)
    align = TextAlign(12, 32, bias='bounded', ratio=0.3).double()
    assert not any(name.endswith('bias') and 'norm' not in name for name, _ in align.named_parameters())
    s = float(align.ratio().detach())
    assert math.isclose(s, 0.3, rel_tol=1e-6)
    with torch.no_grad():
        align.out.weight.mul_(1e4)                                   # weights grown 10^4-fold: u stays bounded
        align.norm.weight.normal_(1, 0.2)
        align.norm.bias.normal_(0, 0.2)
    feat = torch.relu(torch.randn(2, 32, 4, 5, dtype=torch.float64) * 3 + 1)
    text = torch.randn(2, 1, 12, dtype=torch.float64)
    u = align.out(align.value(align.mlp(align.proj(text[:, 0]))))
    u_hat = (u - u.mean(-1, keepdim=True)) / (u - u.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).sqrt()
    x = feat.flatten(2).transpose(1, 2)                                              # [N,L,C]
    sigma = (x.var(-1, correction=0, keepdim=True) + align.norm.eps).sqrt()
    want = F.layer_norm(x + s * sigma * u_hat[:, None], (32,), align.norm.weight, align.norm.bias, align.norm.eps)
    got = align(feat, text)
    assert torch.allclose(got, want.transpose(1, 2).reshape_as(feat), atol=1e-10)
    term = align.text_term(x, align.encode_text(text))
    term = term - term.mean(-1, keepdim=True)
    per_pixel = term.norm(dim=-1) / (x.var(-1, correction=0) * 32 + 32 * align.norm.eps).sqrt()
    assert torch.allclose(per_pixel, torch.full_like(per_pixel, s), atol=1e-12)
    assert math.isclose(align.text_ratio(x, align.encode_text(text)), s, rel_tol=1e-9)
    zero = align.text_term(x, align.encode_text(torch.zeros_like(text)))
    assert torch.equal(zero, torch.zeros_like(zero))
    with torch.no_grad():
        align.ratio_logit.fill_(50.0)                                # the share never exceeds the bound
    assert float(align.ratio().detach()) <= MAX_TEXT_RATIO


def test_template_text_bias_is_the_reference_and_unbounded():
    torch.manual_seed(0)
    align = TextAlign(12, 32, bias='template').double()
    assert align.out.bias is not None and not hasattr(align, 'ratio_logit')
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    text = torch.randn(2, 1, 12, dtype=torch.float64)
    before = align.text_ratio(x, align.encode_text(text))
    with torch.no_grad():
        align.out.bias.mul_(1e3)
    assert align.text_ratio(x, align.encode_text(text)) > 100 * before       # the health reading sees it grow


def test_table_encoding_removes_what_all_rows_share():
    r"""Bounded: a row's direction is that of u(t_r) less the mean over the table's rows (classes + background), so
    adding one vector to every text changes nothing, a permutation of the rows permutes the encodings, and with two
    rows they are opposite; in attribute mode the keys lose their mean, which leaves the attention weights as they
    were (every query-key product shifts by one constant)."""
    torch.manual_seed(0)
    align = TextAlign(12, 32, bias='bounded').double()
    table = torch.randn(5, 1, 12, dtype=torch.float64)
    mask = torch.ones(5, 1, dtype=torch.bool)
    enc = align.encode_table(table, mask)
    u = align.out(align.value(align.mlp(align.proj(table[:, 0]))))
    direction = u - u.mean(0)
    assert torch.allclose(enc, F.layer_norm(direction, (32,), eps=1e-12), atol=1e-12)
    assert torch.allclose(align.encode_table(table[[3, 0, 4, 1, 2]], mask), enc[[3, 0, 4, 1, 2]], atol=1e-12)
    pair = align.encode_table(table[:2], mask[:2])
    assert torch.allclose(pair[0], -pair[1], atol=1e-12)
    attr = TextAlign(12, 32, mode='attributes', bias='bounded').double().eval()
    table = torch.randn(3, 4, 12, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    keys = attr.encode_table(table, mask)
    assert torch.allclose(keys[mask].mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    raw = attr.encode_text(table)
    _, w_raw = attr.attn(x, raw, raw, key_padding_mask=~mask, need_weights=True)
    _, w_centred = attr.attn(x, keys, keys, key_padding_mask=~mask, need_weights=True)
    assert torch.allclose(w_raw, w_centred, atol=1e-12)


# --- the optimiser group ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('method, kind, host_groups', [('patnet', torch.optim.Adam, 1), ('ifa', torch.optim.SGD, 1),
                                                       ('pmms', torch.optim.SGD, 3)])
@pytest.mark.slow
def test_plugin_has_its_own_optimizer_group(method, kind, host_groups):
    model = quiet_model(config(method))
    recipe = model.configure_optimizers(lr=2e-3, total_steps=10)
    groups = recipe.optimizer.param_groups
    assert isinstance(recipe.optimizer, kind) and len(groups) == host_groups + 1
    mine = groups[-1]
    scale = LR_SCALES['adam' if kind is torch.optim.Adam else 'sgd']
    assert mine['name'] == 'cdtg' and math.isclose(mine['lr'], scale * 2e-3)
    assert mine['weight_decay'] == 0.01 and mine['decoupled_weight_decay'] and mine['max_grad_norm'] == 1.0
    plugin = {id(p) for p in model.hooks.parameters() if p.requires_grad}
    assert {id(p) for p in mine['params']} == plugin
    host = [id(p) for g in groups[:-1] for p in g['params']]
    assert not plugin & set(host) and len(host) == len(set(host))
    assert set(host) | plugin == {id(p) for p in model.trainable_parameters()}
    if method == 'pmms':                    # the host's own groups keep the reference's rates (ResNet convs: no bias)
        assert [(g['name'], g['lr'] / 2e-3) for g in groups[:-1]] == [('backbone_weight', 1.0), ('weight', 10.0),
                                                                       ('bias', 20.0)]
    record = model.hooks.record()['optimizer']
    assert record['lr'] == mine['lr'] and record['host_lr'] == 2e-3 and record['optimizer'] in ('adam', 'sgd')
    given = quiet_model(config(method, cdtg_lr_scale=0.5)).configure_optimizers(lr=2e-3).optimizer.param_groups
    assert math.isclose(given[-1]['lr'], 1e-3)
    if recipe.scheduler is not None:                             # the host's schedule scales the plug-in's rate too
        recipe.optimizer.step()
        for _ in range(6):
            recipe.scheduler.step()
        assert math.isclose(groups[-1]['lr'] / groups[0]['lr'], mine['initial_lr'] / groups[0]['initial_lr'])


def test_plugin_weight_decay_is_decoupled_and_its_clip_its_own():
    r"""Adam host: a zero-gradient step leaves the host's weights and shrinks the plug-in's by exactly (1 - lr·wd)
    (AdamW); clip_gradients clips the plug-in's group to its own norm and leaves the host's gradients alone."""
    torch.manual_seed(0)
    model = quiet_model(config('patnet', cdtg_weight_decay=0.5, cdtg_width=64))     # small: exact float32 norms
    recipe = model.configure_optimizers(lr=1e-3)
    group = recipe.optimizer.param_groups[-1]
    for p in model.trainable_parameters():
        p.grad = torch.zeros_like(p)
    before = {id(p): p.detach().clone() for p in model.trainable_parameters()}
    recipe.optimizer.step()
    for p in model.host_parameters():
        assert torch.equal(p, before[id(p)])
    for p in group['params']:
        assert torch.allclose(p, before[id(p)] * (1 - group['lr'] * 0.5), rtol=0, atol=1e-12)
    for p in model.trainable_parameters():
        p.grad = torch.full_like(p, 3.0)
    host_before = [p.grad.clone() for p in model.host_parameters()]
    total, norms = clip_gradients(recipe.optimizer, model.trainable_parameters(), float('inf'))
    numel = sum(p.numel() for p in group['params'])
    assert math.isclose(float(norms['cdtg']), 3.0 * numel ** 0.5, rel_tol=1e-3)      # torch's float32 norm
    scale = 1.0 / (float(norms['cdtg']) + 1e-6)                                     # to norm 1.0, torch's rule
    assert all(torch.allclose(p.grad, torch.full_like(p, 3.0 * scale)) for p in group['params'])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.host_parameters(), host_before))
    host_norm = 3.0 * sum(g.numel() for g in host_before) ** 0.5
    assert math.isclose(float(total), math.hypot(host_norm, 3.0 * scale * numel ** 0.5), rel_tol=1e-3)


@pytest.mark.slow
def test_resuming_optimizer_state_of_other_groups_is_a_clear_error(datapath, tmp_path):
    base = ['--method', 'patnet', '--benchmark', 'synthetic', '--datapath', str(datapath), '--backbone-weights',
            'none', '--img-size', '64', '--bsz', '2', '--episodes-per-epoch', '2', '--val-episodes', '2', '--workers',
            '0', '--tb-images', '0', '--cdtg-width', '64', '--logpath', str(tmp_path)] + CDTG_FLAGS
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train_cli.main(base + ['--epochs', '1'])
        ckpt = load_checkpoint(tmp_path / 'last.pt')
        state = ckpt['optimizer']
        state['param_groups'] = state['param_groups'][:1]                # as written before the plug-in's group
        save_checkpoint(ckpt, tmp_path / 'last.pt')
        with pytest.raises(UserError, match='older version'):
            train_cli.main(base + ['--epochs', '2', '--resume'])


# --- fusion and texts ---------------------------------------------------------------------------------------------
class _Table(CDTG):
    r"""CDTG with a fixed random text table instead of CLIP."""

    def __init__(self, channels, levels, point, cfg, n_classes=3):
        super().__init__(channels, levels, point, cfg)
        g = torch.Generator().manual_seed(0)
        self.register_buffer('text_table', torch.randn(n_classes + 1, 1, 512, generator=g), persistent=False)
        self.register_buffer('text_mask', torch.ones(n_classes + 1, 1, dtype=torch.bool), persistent=False)
        self.benchmark, self.class_names = 'fake', [f'c{i}' for i in range(n_classes)]


def test_gated_fusion_starts_at_the_host_and_learns_its_gate():
    torch.manual_seed(0)
    plugin = _Table([8, 16], [2, 3], 'prototypes', CDTGConfig(clip_weights='none', fusion='gated', style_aug=False))
    feats = [torch.randn(4, 8, 6, 6), torch.randn(4, 16, 3, 3)]
    ctx = EpisodeContext(torch.tensor([0, 2]), 2, (torch.rand(4, 24, 24) > 0.5).float())
    fg = [torch.randn(2, 3, f.shape[1]) for f in feats]
    bg = [torch.randn(2, 3, f.shape[1]) for f in feats]
    new_fg, new_bg = plugin.prototypes(fg, bg, feats, ctx)
    assert all(torch.equal(a, b) for a, b in zip(new_fg + new_bg, fg + bg))        # exactly the host's at start
    (sum(f.sum() for f in new_fg) + sum(b.sum() for b in new_bg)).backward()
    assert plugin.gate.grad is not None and bool((plugin.gate.grad != 0).all())
    with torch.no_grad():
        plugin.gate.fill_(1.0)                                   # g = 1: the paper's fixed fusion at alpha
    fixed = _Table([8, 16], [2, 3], 'prototypes', CDTGConfig(clip_weights='none', style_aug=False))
    fixed.load_state_dict(plugin.state_dict(), strict=False)
    with torch.no_grad():
        ours, paper = plugin.prototypes(fg, bg, feats, ctx)[0], fixed.prototypes(fg, bg, feats, ctx)[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, paper))
    with pytest.raises(UserError, match='already a gated residual'):
        CDTG([8], [2], 'features', CDTGConfig(clip_weights='none', fusion='gated'))


def test_alpha_override_is_refused_for_a_gated_checkpoint():
    from argparse import Namespace
    args = Namespace(alpha=0.5, clip_weights=None, text_cache=None, descriptions=None, cdtg=False)
    with pytest.raises(UserError, match='gated'):
        CDTGPlugin.test_overrides(CDTGPlugin.from_saved(config('patnet', fusion='gated'), None), args, 'x.pt', 'patnet')


@pytest.mark.slow
def test_text_controls_random_and_shuffled():
    names = ['a', 'b', 'c', 'd']
    texts = [[f'A photo of {n}.'] for n in names]

    def bound(text: str, seed: int = 0) -> CDTG:
        plugin = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none', text=text, seed=seed))
        plugin.bind_texts('demo', names, texts, ['A photo of the background.'])
        return plugin
    plain, shuffled, shuffled_again = bound('descriptions'), bound('shuffled'), bound('shuffled')
    record = shuffled.texts_used['demo']
    perm = [names.index(record['described_by'][n]) for n in names]
    assert sorted(perm) == [0, 1, 2, 3] and all(p != i for i, p in enumerate(perm))         # a derangement
    assert torch.equal(shuffled.text_table[:4], plain.text_table[perm])
    assert torch.equal(shuffled.text_table[4], plain.text_table[4])                           # background kept
    assert torch.equal(shuffled.text_table, shuffled_again.text_table)                        # seeded
    rand, other_seed = bound('random'), bound('random', seed=1)
    assert torch.allclose(rand.text_table.norm(dim=-1), torch.ones(5, 1))
    assert not torch.allclose(rand.text_table, plain.text_table, atol=0.1)
    assert not torch.equal(rand.text_table, other_seed.text_table)
    assert rand.texts_used['demo']['text'] == 'random' and 'text' not in plain.texts_used['demo']
    one = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none', text='shuffled'))
    with pytest.raises(UserError, match='another class'):
        one.bind_texts('lung', ['lung'], [['A photo of lungs.']], ['A photo of the background.'])
    with pytest.raises(UserError, match='--text-lora'):
        CDTGConfig(text='random', text_lora=4).validate()


# --- health -------------------------------------------------------------------------------------------------------
def test_health_warning_after_a_run_of_indistinguishable_texts_and_files(tmp_path):
    plugin = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none'))

    class Log:
        dir, lines, scalars = tmp_path, [], {}

        def info(self, msg):
            self.lines.append(msg)

        def scalar(self, tag, value, step):
            self.scalars[tag] = value

        def write_json(self, name, data):
            (tmp_path / name).write_text(json.dumps(data))

    log = Log()
    health = HealthLog(log, plugin, tmp_path)
    alike = {'u_over_f': [0.3], 'text_proto_cos': ALIKE_COS + 0.005, 'fg_fraction': 0.1}
    for step in range(0, ALIKE_STEPS, 50):
        health.record(step, 0, alike)
    assert not any('indistinguishable' in line for line in log.lines)
    health.record(ALIKE_STEPS, 0, alike)
    assert sum('indistinguishable since step 0' in line for line in log.lines) == 1
    health.record(ALIKE_STEPS + 50, 0, alike)                                       # warned once per run of them
    health.record(ALIKE_STEPS + 100, 0, dict(alike, text_proto_cos=0.5))
    health.record(ALIKE_STEPS + 150, 0, alike)
    assert sum('indistinguishable' in line for line in log.lines) == 1
    last = json.loads((tmp_path / 'health.json').read_text())
    assert last['step'] == ALIKE_STEPS + 150 and last['u_over_f'] == [0.3]
    assert len((tmp_path / 'health.jsonl').read_text().splitlines()) == 6
    assert log.scalars['health/u_over_f/level0'] == 0.3 and 'health/fg_fraction' in log.scalars


# --- training keeps the text guidance -----------------------------------------------------------------------------
def _prototype_call(model, batch):
    r"""The (feats, ctx) the plug-in's prototypes hook receives for `batch` (eval mode)."""
    seen = []
    original = model.hooks.prototypes

    def spy(fg, bg, feats, ctx):
        seen.append((feats, ctx))
        return original(fg, bg, feats, ctx)
    model.hooks.prototypes = spy
    try:
        with torch.no_grad():
            model(batch['query_img'], batch['support_imgs'], batch['support_masks'], batch['class_id'])
    finally:
        del model.hooks.prototypes
    return seen[0]


def _text_prototype(model, feats, ctx, row: int) -> list[torch.Tensor]:
    r"""FP_t of every tap for the supports of ctx, described by table row `row`."""
    hooks = model.hooks
    masks = resized_masks(ctx.support_masks, feats)
    encoded = hooks._encoder_cache()
    rows = torch.full((feats[0].shape[0],), row, dtype=torch.long)
    with torch.no_grad():
        return [hooks.pooled_texts(hooks.tap_level[i], f, [hooks.text_mask[rows]], [masks[tuple(f.shape[-2:])]],
                                   [encoded(hooks.tap_level[i], rows)])[0] for i, f in enumerate(feats)]


@pytest.mark.parametrize('method', ['patnet', 'ifa', 'pmms'])
@pytest.mark.slow
def test_training_keeps_the_text_guidance(method, datapath, tmp_path):
    r"""80 training steps of the host + CD-TG on the synthetic source (its defaults: Adam PATNet, SGD IFA, PMMs'
    four SGD groups): at every health reading ||u||/||F|| stays below its bound at every level; at the end the text
    prototypes of two different classes on one support differ (largest cosine < 0.99), and binding two classes'
    descriptions the other way round swaps their text prototypes. (The reference template in the host's group — the
    code before the plug-in had its own group — reached ||u||/||F|| of 20-350 and a cosine of 1.000 on PATNet.)"""
    run = tmp_path / method
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train_cli.main(['--method', method, '--benchmark', 'synthetic', '--datapath', str(datapath),
                        '--backbone-weights', 'none', '--bn-calibration', '32', '--img-size', '48', '--bsz', '2',
                        '--epochs', '1', '--episodes-per-epoch', '160', '--val-episodes', '4', '--workers', '0',
                        '--seed', '0', '--log-every', '10', '--tb-images', '0', '--logpath', str(run)] + CDTG_FLAGS)
    readings = [json.loads(line) for line in (run / 'health.jsonl').read_text().splitlines()]
    assert [r['step'] for r in readings] == list(range(0, 80, 10))
    for r in readings:
        assert all(v is not None and v < MAX_TEXT_RATIO for v in r['u_over_f']), r['u_over_f']
    last = json.loads((run / 'health.json').read_text())
    assert last['step'] == 70 and last['text_proto_cos'] < 0.99 and len(last['u_over_f']) == len(last['tp_bp_cos'])

    model, _ = load_model(str(run / 'last.pt'), torch.device('cpu'))
    from data import build_dataset
    ds = build_dataset('synthetic', datapath, 'val', 1, 48)
    episodes = [ds[e] for e in ds.sample_episodes(4, seed=1)]
    batch = {k: torch.stack([e[k] for e in episodes]) for k in ('query_img', 'support_imgs', 'class_id')}
    batch['support_masks'] = torch.stack([e['support_masks'] for e in episodes]).float()
    model.hooks.bind(ds.name, ds.class_names)
    model.hooks.probing = True
    feats, ctx = _prototype_call(model, batch)
    model.hooks.probing = False
    assert model.hooks.readings()['text_proto_cos'] < 0.99
    a, b = 0, 5
    tp_a, tp_b = _text_prototype(model, feats, ctx, a), _text_prototype(model, feats, ctx, b)
    seen = [i for i, f in enumerate(feats) if tp_a[i].norm() > 0]
    cos = max(float(F.cosine_similarity(tp_a[i], tp_b[i], dim=-1).max()) for i in seen)
    assert cos < 0.99
    names = list(ds.class_names)
    names[a], names[b] = names[b], names[a]
    model.hooks.bind(ds.name, names)                           # class a now described by class b's text
    swapped = _text_prototype(model, feats, ctx, a)
    for i in seen:
        assert not torch.allclose(swapped[i], tp_a[i], atol=1e-4)
        assert torch.allclose(swapped[i], tp_b[i], atol=1e-5)


@pytest.mark.slow
def test_alpha_one_without_style_trains_the_host_bit_for_bit(datapath, tmp_path):
    r"""The no-harm check's control arm: training with the plug-in at alpha = 1 (no style augmentation), its own
    group, clip and weight decay, and the health probes, leaves the host's training exactly as without it."""
    runs = {}
    for name, extra in (('host', []), ('alpha1', CDTG_FLAGS + ['--alpha', '1', '--no-style-aug'])):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            runs[name] = train_cli.main(['--method', 'patnet', '--benchmark', 'synthetic', '--datapath',
                                         str(datapath), '--backbone-weights', 'none', '--bn-calibration', '16',
                                         '--img-size', '64', '--bsz', '2', '--epochs', '1', '--episodes-per-epoch',
                                         '8', '--val-episodes', '4', '--workers', '0', '--log-every', '2',
                                         '--tb-images', '0', '--logpath', str(tmp_path / name)] + extra)
    host = load_checkpoint(tmp_path / 'host' / 'last.pt')['model']
    guided = load_checkpoint(tmp_path / 'alpha1' / 'last.pt')['model']
    assert set(host) < set(guided) and any(k.startswith('hooks.') for k in guided)
    assert all(torch.equal(host[k], guided[k]) for k in host)
    assert runs['host']['best'] == runs['alpha1']['best']


@pytest.mark.slow
def test_health_probes_change_nothing_the_training_sees(datapath, tmp_path):
    r"""The same run probed at every step and at every other step gives bit-identical weights."""
    for every in ('1', '2'):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            train_cli.main(['--method', 'patnet', '--benchmark', 'synthetic', '--datapath', str(datapath),
                            '--backbone-weights', 'none', '--img-size', '64', '--bsz', '2', '--epochs', '1',
                            '--episodes-per-epoch', '6', '--val-episodes', '2', '--workers', '0', '--tb-images', '0',
                            '--cdtg-width', '64', '--log-every', every, '--logpath', str(tmp_path / every)]
                           + CDTG_FLAGS)
    assert [len((tmp_path / every / 'health.jsonl').read_text().splitlines()) for every in ('1', '2')] == [3, 2]
    probed, fewer = (load_checkpoint(tmp_path / every / 'last.pt')['model'] for every in ('1', '2'))
    assert all(torch.equal(probed[k], fewer[k]) for k in probed)


@pytest.mark.slow
def test_every_new_flag_reaches_the_plugin_the_checkpoint_and_results(datapath, tmp_path):
    import test as test_cli
    run = tmp_path / 'run'
    flags = ['--cdtg-text-ratio', '0.5', '--cdtg-lr-scale', '0.2', '--cdtg-weight-decay', '0.1', '--cdtg-grad-clip',
             '0', '--fusion', 'gated', '--cdtg-text', 'shuffled', '--cdtg-width', '64']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train_cli.main(['--method', 'patnet', '--benchmark', 'synthetic', '--datapath', str(datapath),
                        '--backbone-weights', 'none', '--img-size', '64', '--bsz', '2', '--epochs', '1',
                        '--episodes-per-epoch', '4', '--val-episodes', '2', '--workers', '0', '--tb-images', '0',
                        '--log-every', '1', '--lr', '1e-3', '--logpath', str(run)] + CDTG_FLAGS + flags)
        plugin = load_checkpoint(run / 'best.pt')['plugin']
        res = test_cli.main(['--load', str(run / 'best.pt'), '--benchmark', 'synthetic-med', '--datapath',
                             str(datapath), '--episodes', '2', '--workers', '0', '--logpath', str(tmp_path / 't')])
    cfg = plugin['config']
    assert (cfg['text_ratio'], cfg['lr_scale'], cfg['weight_decay'], cfg['grad_clip'], cfg['fusion'], cfg['text'],
            cfg['text_bias']) == (0.5, 0.2, 0.1, 0.0, 'gated', 'shuffled', 'bounded')
    assert plugin['optimizer'] == res['plugin']['optimizer']
    assert math.isclose(plugin['optimizer']['lr'], 2e-4) and plugin['optimizer']['max_grad_norm'] is None
    assert 'grad_norm_cdtg' not in json.loads((run / 'health.json').read_text())     # no clip of its own: no norm
    first = json.loads((run / 'health.jsonl').read_text().splitlines()[0])
    assert all(abs(v - 0.5) < 1e-3 for v in first['u_over_f'] if v is not None)
    assert first['text_weight'] == [0.0, 0.0, 0.0]                                   # gated: starts at the host
    assert res['plugin']['descriptions']['synthetic-med']['text'] == 'shuffled'
    with pytest.raises(UserError, match='--cdtg-text-ratio'):
        CDTGConfig(text_bias='template', text_ratio=0.5).validate()

r"""Comparability with published numbers (issue 9): the training loss on boundary pixels, Chest X-ray populations, the
CD-TG WBC protocol, what results.json records, the CD-TG readings (aligned maps, shared width, generic background)
and the reference captions."""
import copy
import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fixtures_targets as ft
import test as test_cli
from common.errors import UserError
from data import build_dataset
from engine.factory import build_model
from engine.loops import EpochPlan, train_epoch
from model.base import FewShotSegmenter, Output, Recipe
from model.layers import masked_average_pooling, resize_mask
from tests.golden.make import CDTG_CLASSES, cdtg_config, deterministic_init, episode
from text.plugin import CDTG, GENERIC_BACKGROUND, CDTGConfig
from text.settings import CDTGPlugin


# --- the training loss on label-255 pixels -------------------------------------------------------------------------
class _ImageTaps(nn.Module):
    channels, stage_ids = [3], [1]

    def forward(self, img):
        return [img]


class ConstantLogits(FewShotSegmenter):
    r"""The same two logits at every pixel: its cross-entropy is a hand count of labels."""
    kshot = 'vote'
    plugin_point = 'features'

    def __init__(self):
        super().__init__(_ImageTaps())
        self.logit = nn.Parameter(torch.tensor([0.4, -0.3]))

    def match(self, record):
        b, k = record.batch, record.nshot
        return Output(self.logit.view(1, 1, 2, 1, 1).expand(b, k, 2, *record.image_size))


@pytest.mark.parametrize('boundary', ['background', 'ignore'])
def test_boundary_pixels_are_trained_as_background_by_default(boundary):
    r"""PASCAL's 255 pixels: the reference trains them as background (no ignore index); --train-boundary ignore
    leaves them out of the loss. The training loop's loss against a hand count, in float64."""
    mask = torch.zeros(1, 6, 6, dtype=torch.uint8)
    mask[0, 1:3, 1:4] = 1                                   # 6 foreground pixels
    mask[0, 4, :] = 255                                     # 6 boundary pixels, 24 background pixels
    batch = {'query_img': torch.zeros(1, 3, 6, 6), 'support_imgs': torch.zeros(1, 1, 3, 6, 6),
             'support_masks': torch.ones(1, 1, 6, 6), 'class_id': torch.tensor([0]), 'query_mask': mask}
    model = ConstantLogits()
    terms = {}
    train_epoch(model, [batch], Recipe(torch.optim.SGD(model.parameters(), lr=0.0)), torch.device('cpu'), ['a'],
                EpochPlan(boundary=boundary), on_step=lambda step, loss, t: terms.update(t))
    log_p = torch.log_softmax(torch.tensor([0.4, -0.3], dtype=torch.float64), 0)
    n_bg = 24 + (6 if boundary == 'background' else 0)
    expected = -(n_bg * log_p[0] + 6 * log_p[1]) / (n_bg + 6)
    assert float(terms['ce'].detach()) == pytest.approx(float(expected), rel=1e-6)
    assert int(batch['query_mask'].eq(255).sum()) == 6     # the metric still sees (and ignores) the boundary


# --- Chest X-ray populations ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lung_subsets_and_what_results_json_records(tmp_path):
    r"""566 Shenzhen + 138 Montgomery = 704 pairs, scaled down 20x: 28 + 7 = 35 (2 unmasked Shenzhen images)."""
    ft.write_lung(tmp_path, shenzhen=30, montgomery=7)
    counts = {subset: len(build_dataset('lung', tmp_path, 'test', 1, 32, lung_subset=subset).class_items[0])
              for subset in ('shenzhen', 'montgomery', 'all')}
    assert counts == {'shenzhen': 28, 'montgomery': 7, 'all': 35}
    only = build_dataset('lung', tmp_path, 'test', 1, 32, lung_subset='shenzhen')
    assert all(k.startswith('CHNCXR_') for k in only.class_items[0])
    with pytest.raises(UserError, match='--lung-subset'):
        build_dataset('lung', tmp_path, 'test', 1, 32, lung_subset='nlm')
    with pytest.raises(UserError, match='does not apply'):
        build_dataset('isic', tmp_path, 'test', 1, 32, lung_subset='shenzhen')
    ckpt = ft.tiny_checkpoint(tmp_path / 'ckpt' / 'best.pt', img_size=32)
    run_dir = tmp_path.with_name(tmp_path.name + '-run')          # outputs never inside --datapath
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = test_cli.main(['--load', str(ckpt), '--benchmark', 'lung', '--datapath', str(tmp_path), '--episodes',
                             '2', '--workers', '0', '--device', 'cpu', '--lung-subset', 'shenzhen',
                             '--logpath', str(run_dir)])
    saved = json.loads((run_dir / 'results.json').read_text())
    assert saved['conventions'] == res['conventions']
    conv = saved['conventions']
    assert conv['lung_subset'] == 'shenzhen' and conv['metric']['miou_over'] == 'all'
    assert conv['wbc_protocol'] is None and conv['volumetric_support'] is None
    assert conv['cdtg_reading'] is None and conv['text_encoder'] is None and conv['tf32'] is False
    assert conv['train_boundary'] == 'ignore'               # a checkpoint from before the flag left 255 out
    assert saved['classes_without_episodes'] == []
    assert all(e['query'].startswith('CHNCXR_') for e in saved['episodes'])


# --- WBC: the CD-TG release's protocol ------------------------------------------------------------------------------
def test_wbc_cdtg_protocol_classes_size_and_episodes(tmp_path):
    r"""cdtg: cytoplasm = raw mask >= 128 (the whole cell, as the release binarises), nucleus = 255; 321x321; every
    (image, class) pair once as the query. ours: cytoplasm = the 128 ring."""
    fx = ft.write_wbc(tmp_path)
    ours = build_dataset('wbc', tmp_path, 'test', 1, 64)
    cdtg = build_dataset('wbc', tmp_path, 'test', 1, 64, wbc_protocol='cdtg')
    cyto, nucleus = cdtg.class_names.index('cytoplasm'), cdtg.class_names.index('nucleus')
    assert cdtg.img_size == 321 and ours.img_size == 64
    assert sorted(cdtg.class_items[cyto]) == sorted(fx['masks'])          # every cell has a cell body
    assert 'ds1/005' not in ours.class_items[cyto]                          # no ring around that nucleus
    for key, raw in fx['masks'].items():
        assert np.array_equal(cdtg.read_mask(key, cyto), (raw >= 128).astype(np.uint8))
        assert np.array_equal(cdtg.read_mask(key, nucleus), (raw >= 192).astype(np.uint8))   # snapped 255
        ring = ((raw >= 64) & (raw < 192)).astype(np.uint8)                 # snapped 128
        assert np.array_equal(ours.read_mask(key, cyto), ring)
    pairs = sum(len(items) for items in cdtg.class_items)
    assert cdtg.default_episodes == pairs and ours.default_episodes == 600
    episodes = cdtg.sample_episodes(pairs, seed=0)
    assert sorted((e.class_id, e.query) for e in episodes) == sorted(
        (c, k) for c, items in enumerate(cdtg.class_items) for k in items)
    assert all(e.query not in e.supports for e in episodes)
    with pytest.raises(UserError, match='every image once'):
        cdtg.sample_episodes(600, seed=0)
    with pytest.raises(UserError, match='--wbc-protocol'):
        build_dataset('wbc', tmp_path, 'test', 1, 64, wbc_protocol='cd-tg')
    batch = cdtg[episodes[0]]
    assert batch['query_img'].shape[-2:] == (321, 321)


# --- CD-TG readings -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cdtg_features_feed_aligned_maps_to_patnet(monkeypatch):
    r"""--cdtg-features (the framework figure): PATNet's correlation reads alpha F + (1-alpha) A(F); its prototypes,
    pooled from those maps, equal alpha MAP(F) + (1-alpha) MAP(A(F)) (MAP is linear in the map); alpha = 1 is an
    exact identity. (A 64-d shared alignment space keeps the plug-in small; the reading does not depend on it.)"""
    import model.patnet as patnet_module
    from model import build_method
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        plain = deterministic_init(build_method('patnet', 'resnet50', 'none')).eval()
    guided = copy.deepcopy(plain)
    config = dict(cdtg_config('patnet', None), alpha=1.0, cdtg_features=True, cdtg_width=64)
    guided.attach(deterministic_init(CDTGPlugin.build(CDTGPlugin.from_saved(config, None), guided), seed=5).eval())
    guided.hooks.bind('synthetic-med', CDTG_CLASSES)
    ep = episode(1, 1)
    ep['class_id'] = torch.tensor([1])
    args = (ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
    seen = []
    original = patnet_module.multilayer_correlation
    monkeypatch.setattr(patnet_module, 'multilayer_correlation',
                        lambda q, s, ids, **kw: seen.append(q[0]) or original(q, s, ids, **kw))
    with torch.no_grad():
        assert torch.equal(plain(*args).logits, guided(*args).logits)
        guided.hooks.config.alpha = 0.5
        guided(*args)
        assert not torch.allclose(seen[0], seen[-1])                       # aligned maps reach the correlation
        assert guided.hooks.reading()['maps'].startswith('figure')
        # prototypes of the figure reading, by hand in float64
        args64 = [a.double() if a.is_floating_point() else a for a in args]
        raw, record = plain.double().encode(*args64), guided.double().encode(*args64)
        hooks = guided.hooks
        f = raw.support_feats[0]                                           # the backbone's own map (tap 0)
        text, mask = hooks.class_texts(ep['class_id'])
        aligned = hooks.aligned(hooks.tap_level[0], f, text, mask)
        m = resize_mask(raw.ctx.support_masks, tuple(f.shape[-2:]), torch.float64)
        fg, _ = guided.prototypes(record.support_feats, record.ctx)
        by_hand = 0.5 * masked_average_pooling(f, m, eps=1e-6) + 0.5 * masked_average_pooling(aligned, m, eps=1e-6)
        assert torch.allclose(record.support_feats[0], 0.5 * f + 0.5 * aligned, atol=1e-10)
        assert torch.allclose(fg[0], by_hand, atol=1e-10)
        hooks.config.maps = False                                          # the released code's reading
        assert hooks.reading()['maps'].startswith('code')
        assert torch.equal(guided.encode(*args64).support_feats[0], f)     # the host keeps its own maps


def test_cdtg_features_and_background_are_refused_where_they_mean_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(UserError, match='--cdtg-features'):
            build_model(dict(cdtg_config('hsnet', None), cdtg_features=True), 'none')
        with pytest.raises(UserError, match='--cdtg-background'):
            build_model(dict(cdtg_config('hsnet', None), cdtg_background='generic'), 'none')


def test_shared_width_alignment_by_hand():
    r"""--cdtg-width W: levels of width C != W go through Linear C -> W, one shared TextAlign(W), Linear W -> C; a
    level of width W uses the shared module directly. Parameter count and the map, by hand in float64 (the template's
    text bias, whose u has a closed form per text)."""
    cfg = CDTGConfig(clip_weights='none', width=8, style_aug=False, text_bias='template')
    plugin = CDTG([8, 8, 16], [2, 2, 3], 'prototypes', cfg).double()
    d, w = 512, 8
    shared = d * w + w + 2 * (w * w + w) + 2 * (w * w + w) + 2 * w          # proj, MLP, value + out, LayerNorm
    assert plugin.num_parameters == shared + (16 * w + w) + (w * 16 + 16)           # level 1: down and up
    assert isinstance(plugin.align[0].down, nn.Identity) and plugin.align[1].down.in_features == 16
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 16, 3, 4, generator=g, dtype=torch.float64)
    text = torch.randn(2, 1, d, generator=g, dtype=torch.float64)
    out = plugin.aligned(1, feat, text, None)
    x = feat.flatten(2).transpose(1, 2) @ plugin.align[1].down.weight.T + plugin.align[1].down.bias
    x = torch.nn.functional.layer_norm(x + plugin.shared_align.text_bias(text[:, 0])[:, None], (w,),
                                       plugin.shared_align.norm.weight, plugin.shared_align.norm.bias)
    x = x @ plugin.align[1].up.weight.T + plugin.align[1].up.bias
    assert torch.allclose(out, x.transpose(1, 2).reshape(2, 16, 3, 4), atol=1e-12)
    assert plugin.reading()['width'] == 'shared 8-d'
    per_level = CDTG([512, 1024, 2048], [2, 3, 4], 'prototypes', CDTGConfig(clip_weights='none'))
    narrow = CDTG([512, 1024, 2048], [2, 3, 4], 'prototypes', CDTGConfig(clip_weights='none', width=512))
    assert per_level.num_parameters > 23_000_000 and narrow.num_parameters < per_level.num_parameters / 4


@pytest.mark.slow
def test_generic_background_caption():
    r"""--cdtg-background generic: the reference's one background caption instead of the domain's."""
    domain = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none'))
    generic = CDTG([8], [2], 'prototypes', CDTGConfig(clip_weights='none', background='generic'))
    generic.bank = domain.bank                              # one random CLIP for both (same identity)
    for plugin in (domain, generic):
        plugin.bind('wbc', ['nucleus', 'cytoplasm'])
    assert torch.equal(generic.text_table[0], domain.text_table[0])
    assert torch.equal(generic.text_table[-1, 0], generic.bank.embed([GENERIC_BACKGROUND])[0])
    assert not torch.equal(generic.text_table[-1], domain.text_table[-1])
    assert generic.reading()['background'] == 'generic'


# --- the reference's captions -----------------------------------------------------------------------------------
def _reference_folder(tmp_path):
    folder = tmp_path / 'clip_prompts'
    folder.mkdir()
    isic = {'categories': [
        {'id': 0, 'name': 'melanoma', 'supercategory': 'skin_diseases', 'caption': 'A photo of melanoma, dark.'},
        {'id': 1, 'name': 'nevus', 'supercategory': 'skin_diseases', 'caption': 'A photo of a nevus, a  mole.'},
        {'id': 2, 'name': 'seborrheic_keratosis', 'caption': 'A photo of seborrheic keratosis, waxy.'}]}
    (folder / 'isic.json').write_text(json.dumps(isic, indent=2))
    (folder / 'background.json').write_text(json.dumps(
        {'categories': [{'id': 0, 'name': 'BG', 'caption': 'A photo of the background, plain.'}]}))
    (folder / 'chaost2.json').write_text(json.dumps({'categories': [
        {'id': 0, 'name': 'BG', 'caption': 'A photo of the background in which nothing is present.'},
        {'id': 2, 'name': 'RK', 'caption': 'A photo of the right kidney in which it filters blood.'}]}))
    return folder


@pytest.mark.slow
def test_import_captions_and_use_them_with_descriptions(tmp_path):
    import scripts.import_captions as script
    from text.descriptions import load_description_file
    folder = _reference_folder(tmp_path)
    written = script.main(['--reference', str(folder), '--out', str(tmp_path / 'out')])
    assert sorted(p.name for p in written) == ['chaos.yaml', 'isic.yaml']
    isic = load_description_file(tmp_path / 'out' / 'isic.yaml')
    assert isic.benchmark == 'isic' and isic.class_names == ['melanoma', 'nevus', 'seborrheic keratosis']
    assert isic.caption('seborrheic_keratosis') == 'A photo of seborrheic keratosis, waxy.'
    assert isic.caption('nevus') == 'A photo of a nevus, a mole.'             # whitespace normalised only
    assert isic.background_caption == 'A photo of the background, plain.' and isic.background_attributes == []
    assert isic.provenance['source_sha256'] == hashlib.sha256((folder / 'isic.json').read_bytes()).hexdigest()
    chaos = load_description_file(tmp_path / 'out' / 'chaos.yaml')
    assert chaos.class_names == ['right kidney'] and 'RK' in chaos.lookup('rk').aliases
    with pytest.raises(UserError, match='--force'):
        script.main(['--reference', str(folder), '--out', str(tmp_path / 'out')])
    # the file serves its benchmark in the plug-in, and its hash is recorded
    path = tmp_path / 'out' / 'isic.yaml'
    cfg = dict(clip_weights='none', descriptions=str(path))
    plugin = CDTG([8], [2], 'prototypes', CDTGConfig(**cfg))
    plugin.bind('isic', ['melanoma', 'nevus', 'seborrheic keratosis'])
    used = plugin.record()['descriptions']['isic']
    assert used['sha256'] == hashlib.sha256(path.read_bytes()).hexdigest() and used['source'] == '--descriptions'
    assert torch.equal(plugin.text_table[1, 0], plugin.bank.embed(['A photo of a nevus, a mole.'])[0])
    with pytest.raises(UserError, match="describes benchmark 'isic'"):
        CDTG([8], [2], 'prototypes', CDTGConfig(**cfg)).bind('wbc', ['nucleus', 'cytoplasm'])
    with pytest.raises(UserError, match='captions only'):
        CDTG([8], [2], 'prototypes', CDTGConfig(attn='attributes', **cfg)).bind('isic', ['melanoma'])


# --- the grid -------------------------------------------------------------------------------------------------------
def test_grid_runs_chaos_in_both_protocols_and_sweeps_alpha_on_prototype_hosts_only(tmp_path, monkeypatch):
    import scripts.grid as grid
    for name in ('patnet-cdtg', 'hsnet-cdtg'):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'best.pt').write_bytes(b'')                   # trained already: only test.py runs
    calls = []

    def fake_test(cmd):
        calls.append(cmd)
        (tmp_path / cmd[cmd.index('--logpath') + 1]).mkdir(parents=True, exist_ok=True)
        alpha = float(cmd[cmd.index('--alpha') + 1]) if '--alpha' in cmd else 0.7
        return {'miou': 1.0, 'fbiou': 2.0, 'dice': 3.0, 'plugin': {'config': {'alpha': alpha}}}
    monkeypatch.setattr(grid.test_cli, 'main', fake_test)
    rows = grid.main(['--methods', 'patnet', 'hsnet', '--cdtg', 'on', '--targets', 'chaos', 'lung', '--shots', '1',
                      '--logroot', str(tmp_path), '--alphas', '0.5'])
    cells = [(r['method'], r['target'], r['protocol'], r['alpha']) for r in rows]
    assert cells == [('patnet', 'chaos', '2d', 0.7), ('patnet', 'chaos', '2d', 0.5),
                     ('patnet', 'chaos', 'volumetric', 0.7), ('patnet', 'chaos', 'volumetric', 0.5),
                     ('patnet', 'lung', '2d', 0.7), ('patnet', 'lung', '2d', 0.5),
                     ('hsnet', 'chaos', '2d', 0.7), ('hsnet', 'chaos', 'volumetric', 0.7), ('hsnet', 'lung', '2d', 0.7)]
    volumetric = [c for c in calls if '--protocol' in c]
    assert len(volumetric) == 3 and all(c[c.index('--protocol') + 1] == 'volumetric' for c in volumetric)
    assert all('--episodes' not in c for c in calls)                      # test.py's default unless given
    table = (tmp_path / 'grid.md').read_text()
    assert '| chaos | volumetric (Q-Net), 3D Dice |' in table and '| chaos | 2D episodes |' in table

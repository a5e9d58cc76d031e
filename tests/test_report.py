r"""scripts/report.py on fabricated grid folders (tables checked cell by cell, plots, the qualitative figure on the
same episodes for both models) and train.py's TensorBoard images and hparams."""
import csv
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import scripts.report as report
from common.errors import run_cli
from conftest import TINY_TRAIN

CDTG_CONFIG = {'clip': 'ViT-B-32', 'clip_weights': 'none', 'attn': 'paper', 'alpha': 0.7, 'fusion': 'fixed',
               'style_aug': True, 'style_strength': 0.3, 'text_lora': 0, 'text_cache': None, 'seed': 0,
               'text_bias': 'bounded', 'text_ratio': 0.3, 'text': 'descriptions', 'lr_scale': None,
               'weight_decay': 0.01, 'grad_clip': 1.0}


def write_cell(run: Path, tag: str, method: str, benchmark: str, shots: int, miou: float, seed: int,
               **extra) -> Path:
    r"""A cell as grid.py + test.py leave it: <run>/<tag>/results.json and the test's config.yaml. `extra`: plugin
    (its record), test_alpha (a test.py --alpha), episodes, checkpoint, img_size (default 400)."""
    plugin, test_alpha, checkpoint = extra.get('plugin'), extra.get('test_alpha'), extra.get('checkpoint')
    episodes, img_size = extra.get('episodes'), extra.get('img_size', 400)
    cell = run / tag
    cell.mkdir(parents=True)
    results = {'miou': miou, 'fbiou': miou + 10, 'dice': miou + 5, 'nshot': shots, 'seed': 0, 'benchmark': benchmark,
               'split': 'test', 'img_size': img_size, 'checkpoint': str(checkpoint or run / 'best.pt'),
               'method': method, 'method_options': {}, 'backbone': 'resnet50', 'protocol': '2d',
               'test_time_adaptation': {'steps': 0, 'lr': 0.001}, 'plugin': plugin, 'dataset_options': {},
               'episodes': episodes or []}
    (cell / 'results.json').write_text(json.dumps(results))
    (cell / 'config.yaml').write_text(yaml.safe_dump({'alpha': test_alpha, 'seed': 0, 'nshot': shots}))
    (run / 'config.yaml').write_text(yaml.safe_dump({'seed': seed, 'alpha': (plugin or {}).get('trained', 0.7)}))
    return cell


def cdtg(alpha=0.7, **changes) -> dict:
    return {'name': 'cdtg', 'config': dict(CDTG_CONFIG, alpha=alpha, **changes), 'text_encoder': 'x'}


# mIoU of every fabricated main cell: base per method, +3 with CD-TG, per target, +2 at 5 shots, +4 with seed 1
BASE = {'hsnet': 50.0, 'patnet': 53.0}
TARGET = {'isic': 0.0, 'lung': 10.0}


def value(method, on, target, shots, seed):
    return BASE[method] + 3.0 * on + TARGET[target] + (2.0 if shots == 5 else 0.0) + 4.0 * seed


@pytest.fixture(scope='module')
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp('grid')
    for seed in (0, 1):
        for method in BASE:
            for on in (0, 1):
                run = root / f'seed{seed}' / f'{method}{"-cdtg" if on else ""}'
                for target in TARGET:
                    for shots in (1, 5):
                        write_cell(run, f'test-{target}-{shots}shot', method, target, shots,
                                   value(method, on, target, shots, seed), seed, plugin=cdtg() if on else None)
                if method == 'hsnet' and on:                   # test-time alpha overrides, 1-shot
                    for a, gain in ((0.3, -6.0), (1.0, -1.0)):
                        for target in TARGET:
                            write_cell(run, f'test-{target}-1shot-alpha{a:g}', method, target, 1,
                                       value(method, 1, target, 1, seed) + gain, seed, plugin=cdtg(a), test_alpha=a)
    # the same default model trained again (same seeds): must count once
    write_cell(root / 'seed0' / 'retrained' / 'alpha0.7' / 'hsnet-cdtg', 'test-isic-1shot', 'hsnet', 'isic', 1,
               99.0, 0, plugin=cdtg())
    # a component variant, one seed
    for target in TARGET:
        write_cell(root / 'seed0' / 'learned' / 'patnet-cdtg', f'test-{target}-1shot', 'patnet', target, 1, 70.0, 0,
                   plugin=cdtg(fusion='learned'))
    return root


@pytest.mark.slow
def test_tables_have_the_right_numbers(grid, tmp_path, capsys):
    out = tmp_path / 'report'
    result = report.main([str(grid), '--out', str(out), '--no-figure'])
    table = result['table']
    assert table.rows == [('hsnet', 'baseline'), ('hsnet', '+CD-TG'), ('patnet', 'baseline'), ('patnet', '+CD-TG'),
                          ('patnet', '+CD-TG (fusion learned)')]
    md = (out / 'table.md').read_text().splitlines()
    head = [c.strip() for c in md[0].strip('|').split('|')]
    assert head == ['Method', 'ISIC 1-shot', 'ISIC 5-shot', 'Chest X-ray 1-shot', 'Chest X-ray 5-shot', 'Mean 1-shot',
                    'Mean 5-shot', 'Δ 1-shot', 'Δ 5-shot']
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.strip('|').split('|')] for line in md[2:])}
    # hsnet ISIC 1-shot: seeds give 50 and 54: mean 52.0, sample std sqrt(((50-52)^2 + (54-52)^2) / 1) = 2.83;
    # the retrained copy (99.0, seed pair already counted) is left out
    assert rows['hsnet'][0] == '52.0 ± 2.8'
    # hsnet +CD-TG Chest X-ray 5-shot: 50+3+10+2 = 65 and 69 -> 67.0 ± 2.8
    assert rows['hsnet +CD-TG'][3] == '67.0 ± 2.8'
    # Mean 1-shot of hsnet +CD-TG: (55.0 + 65.0) / 2 = 60.0; its baseline (52.0 + 62.0) / 2 = 57.0 -> Δ +3.0
    assert rows['hsnet +CD-TG'][4] == '60.0' and rows['hsnet'][4] == '57.0' and rows['hsnet +CD-TG'][6] == '+3.0'
    assert rows['hsnet'][6] == ''                                            # no Δ on a baseline row
    # the learned-fusion variant: one seed, 1-shot only -> no std, no 5-shot cells, Δ = 70 - (55 + 65) / 2 = +10.0
    learned = rows['patnet +CD-TG (fusion learned)']
    assert learned[0] == '**70.0**' and learned[1] == '–' and learned[4] == '**70.0**' and learned[6] == '+10.0'
    # best per column in bold: ISIC 5-shot is patnet +CD-TG (53+3+2 = 58, 62 -> 60.0 ± 2.8)
    assert rows['patnet +CD-TG'][1] == '**60.0 ± 2.8**' and '**' not in rows['hsnet +CD-TG'][1]
    assert any('repeat a seed pair' in n for n in table.notes) and 'repeat a seed pair' in capsys.readouterr().out

    tex = (out / 'table.tex').read_text()
    assert '\\textbf{60.0 $\\pm$ 2.8}' in tex and '\\multicolumn{2}{c}{Chest X-ray}' in tex and '+3.0' in tex
    with open(out / 'table.csv') as f:
        lines = list(csv.DictReader(f))
    hs = next(r for r in lines if r['method'] == 'hsnet' and r['variant'] == 'baseline')
    assert float(hs['ISIC 1-shot']) == 52.0 and abs(float(hs['ISIC 1-shot std']) - 8 ** 0.5) < 1e-3
    assert hs['ISIC 1-shot n'] == '2' and float(hs['mean 1-shot']) == 57.0
    with open(out / 'cells.csv') as f:
        cells = list(csv.DictReader(f))
    swept = [c for c in cells if c['alpha'] == '0.3' and c['metric'] == 'miou' and c['target'] == 'isic']
    assert len(swept) == 1 and swept[0]['alpha_override'] == '1' and float(swept[0]['mean']) == 49.0   # 47, 51
    assert json.loads(swept[0]['seeds']) == [[0, 0], [1, 0]]

    # the alpha plot's numbers: test-time sweep at 0.3 / 0.7 (own) / 1.0, and the baseline line
    series = report.alpha_series(report.collect([grid]), 'miou')[('isic', 1)]
    sweep = next(points for label, _, _, points in series if label == 'hsnet +CD-TG (test-time α)')
    assert [(a, s.mean) for a, s in sweep] == [(0.3, 49.0), (0.7, 55.0), (1.0, 54.0)]
    base = next(points for label, _, _, points in series if label == 'hsnet baseline')
    assert base[0][1].mean == 52.0
    for name in ('alpha_sweep', 'cdtg_bars'):
        png = (out / f'{name}.png').read_bytes()
        assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
        assert (out / f'{name}.pdf').read_bytes()[:4] == b'%PDF'
    md_report = (out / 'report.md').read_text()
    assert '![alpha sweep](alpha_sweep.png)' in md_report and '![CD-TG bars](cdtg_bars.png)' in md_report


def test_retrained_alphas_make_their_own_line(tmp_path):
    for a, miou in ((0.3, 40.0), (0.7, 50.0), (1.0, 45.0)):
        run = tmp_path / f'alpha{a:g}' / 'hsnet-cdtg'
        plugin = cdtg(a)
        plugin['trained'] = a
        write_cell(run, 'test-isic-1shot', 'hsnet', 'isic', 1, miou, 0, plugin=plugin)
    series = report.alpha_series(report.collect([tmp_path]), 'miou')[('isic', 1)]
    assert [(label, [(x, s.mean) for x, s in points]) for label, _, _, points in series] == \
        [('hsnet +CD-TG (retrained per α)', [(0.3, 40.0), (0.7, 50.0), (1.0, 45.0)])]


def test_bad_grid_folders(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    for argv, expected in (([str(tmp_path / 'empty')], 'holds no test results'),
                           ([str(tmp_path / 'nope')], 'is not a folder'),
                           ([str(tmp_path / 'empty'), '--per-target', '0'], '--per-target')):
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda: report.main(argv))
        out = capsys.readouterr()
        assert stop.value.code == 2 and expected in out.err and 'Traceback' not in out.err
    assert not (tmp_path / 'empty' / 'report').exists()


@pytest.fixture(scope='module')
def figure_grid(datapath, tiny_checkpoint, tiny_cdtg_checkpoint, tmp_path_factory):
    r"""Cells of the tiny baseline and CD-TG checkpoints on the same 6 synthetic-med episodes."""
    from data import build_dataset
    ds = build_dataset('synthetic-med', datapath, 'test', 1, 64)
    episodes = [e.to_json(ds.class_names) for e in ds.sample_episodes(6, 3)]
    root = tmp_path_factory.mktemp('figure_grid')
    write_cell(root / 'hsnet', 'test-synthetic-med-1shot', 'hsnet', 'synthetic-med', 1, 10.0, 0,
               episodes=episodes, checkpoint=tiny_checkpoint, img_size=64)
    write_cell(root / 'hsnet-cdtg', 'test-synthetic-med-1shot', 'hsnet', 'synthetic-med', 1, 12.0, 0, plugin=cdtg(),
               episodes=episodes, checkpoint=tiny_cdtg_checkpoint, img_size=64)
    return root, ds, episodes


@pytest.mark.slow
def test_qualitative_figure_shows_episodes_drawn_by_seed_for_both_models(figure_grid, datapath, tmp_path,
                                                                          monkeypatch):
    root, ds, episodes = figure_grid
    calls, loaded = [], {}
    real, load = report.predict_episodes, report._load
    # both report runs share the loaded models (this test is about which episodes are drawn)
    monkeypatch.setattr(report, '_load', lambda cell, device, args: loaded.setdefault(
        cell.variant, load(cell, device, args)))
    monkeypatch.setattr(report, 'predict_episodes', lambda cell, model, dataset, idx, device:
                        calls.append((cell.variant, list(idx))) or real(cell, model, dataset, idx, device))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        result = report.main([str(root), '--out', str(tmp_path / 'r'), '--datapath', str(datapath),
                              '--per-target', '2', '--seed', '5', '--device', 'cpu'])
    picks = sorted(np.random.default_rng(5).choice(6, size=2, replace=False).tolist())
    assert calls == [('baseline', picks), ('+CD-TG', picks)]                  # the same episodes, by seed
    assert result['figure'] and (tmp_path / 'r' / 'qualitative.png').read_bytes()[:4] == b'\x89PNG'
    text = (tmp_path / 'r' / 'report.md').read_text()
    assert 'drawn at random with seed 5' in text and 'not selected by result' in text

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        report.main([str(root), '--out', str(tmp_path / 'g'), '--datapath', str(datapath), '--sort-by-gain',
                     '--candidates', '3', '--device', 'cpu'])
    assert calls[2:] == [('baseline', [0, 1, 2]), ('+CD-TG', [0, 1, 2])]
    assert 'SELECTED BY RESULT' in (tmp_path / 'g' / 'report.md').read_text()


@pytest.mark.slow
def test_re_predicted_episodes_equal_the_evaluation_loop(figure_grid, tiny_checkpoint):
    r"""The figure re-runs an episode of results.json through the test-time entry point: same images, masks and
    prediction as test.py's evaluation loop on that episode list."""
    from data import Episode, FixedEpisodes, build_loader
    from engine.factory import load_model
    from engine.loops import evaluate
    root, ds, episodes = figure_grid
    cell = report.read_cell(root / 'hsnet' / 'test-synthetic-med-1shot' / 'results.json')
    model, _ = load_model(str(tiny_checkpoint), torch.device('cpu'))
    mine = report.predict_episodes(cell, model, ds, [4], torch.device('cpu'))[0]
    eps = [Episode(e['class_id'], e['query'], tuple(e['supports'])) for e in episodes]
    _, kept = evaluate(model, build_loader(ds, FixedEpisodes(eps), 1, 0), torch.device('cpu'), ds.class_names,
                       keep_predictions=5)
    assert kept[4]['query_name'] == episodes[4]['query'] == mine['query']
    for key in ('query_img', 'query_mask', 'pred'):
        assert torch.equal(mine[key], kept[4][key]), key


def test_different_episode_lists_are_refused(figure_grid, tmp_path, datapath, capsys):
    root, _, episodes = figure_grid
    other = tmp_path / 'g'
    for name, eps in (('hsnet', episodes), ('hsnet-cdtg', episodes[::-1])):
        write_cell(other / name, 'test-synthetic-med-1shot', 'hsnet', 'synthetic-med', 1, 1.0, 0,
                   plugin=cdtg() if 'cdtg' in name else None, episodes=eps, img_size=64)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: report.main([str(other), '--datapath', str(datapath)]))
    assert stop.value.code == 2 and 'different episode lists' in capsys.readouterr().err
    assert not (other / 'report').exists()


def read_events(folder: Path) -> list:
    r"""Every Event of the TensorBoard event files under `folder` (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(folder.rglob('events.out.tfevents.*')):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack('<Q', data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


@pytest.mark.slow
def test_tensorboard_draws_validation_episodes_and_an_hparams_summary(datapath, tmp_path):
    import train
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train.main(TINY_TRAIN + ['--datapath', str(datapath), '--logpath', str(tmp_path), '--tb-images', '2',
                                 '--epochs', '2', '--episodes-per-epoch', '2', '--val-episodes', '3'])
    values = [(e.step, v) for e in read_events(tmp_path / 'tb') for v in e.summary.value]
    images = [(step, v.image) for step, v in values if v.tag == 'val/episodes']
    assert [step for step, _ in images] == [0, 1]                             # every epoch
    png = images[0][1].encoded_image_string
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and images[0][1].height > images[0][1].width / 2   # 2 rows x 3 panels
    tags = {v.tag for _, v in values}
    assert {'_hparams_/experiment', '_hparams_/session_start_info', 'hparam/best_val_miou'} <= tags
    start = next(v for _, v in values if v.tag == '_hparams_/session_start_info')
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    info = HParamsPluginData.FromString(start.metadata.plugin_data.content).session_start_info
    assert info.hparams['method'].string_value == 'hsnet' and info.hparams['img_size'].number_value == 64
    assert info.hparams['cdtg'].bool_value is False


def test_report_names_the_text_bias_of_results_written_before_it_existed():
    current = {'config': {'alpha': 0.7, 'text_bias': 'bounded', 'lr_scale': None}}
    assert report._variant(current, 0.7)[0] == '+CD-TG'
    assert report._variant({'config': {'alpha': 0.7}}, 0.7)[0] == '+CD-TG (text bias template)'
    assert report._variant({'config': {'text': 'shuffled', 'fusion': 'gated', 'text_bias': 'bounded'}}, 0.7)[0] == \
        '+CD-TG (fusion gated, shuffled text)'


def test_report_names_text_encoders_and_the_medical_benchmarks():
    r"""The rows of scripts/ablations/text_encoders.sh, and the columns of its targets, in the order of the paper's."""
    def variant(clip):
        return report._variant({'config': {'clip': clip, 'text_bias': 'bounded'}}, 0.7)[0]
    assert [variant(c) for c in ('ViT-B-32', 'RN50', 'biomedclip', 'pubmedclip')] == \
        ['+CD-TG', '+CD-TG (CLIP RN50)', '+CD-TG (BiomedCLIP)', '+CD-TG (PubMedCLIP)']
    targets = ['kvasir', 'abd-ct:volumetric', 'isic', 'cmr', 'chaos:volumetric', 'abd-ct']
    assert [report.target_label(t) for t in sorted(targets, key=report.target_key)] == \
        ['ISIC', 'CHAOS (3D)', 'ABD-CT', 'ABD-CT (3D)', 'Cardiac MRI', 'Kvasir-SEG']

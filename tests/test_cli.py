r"""train.py / test.py end to end: checkpoints, resume, results, errors, K-shot query sharing, learning."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test as test_cli
import train as train_cli
from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import UserError
from conftest import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r'^mIoU: \d+\.\d\d  FB-IoU: \d+\.\d\d  Dice: \d+\.\d\d$', re.M)


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_checkpoint_contents(tiny_checkpoint):
    best, last = load_checkpoint(tiny_checkpoint), load_checkpoint(tiny_checkpoint.parent / 'last.pt')
    assert best['method'] == 'hsnet' and best['backbone'] == 'resnet50'
    for key in ('model', 'epoch', 'config', 'best', 'checksum'):
        assert key in best and key in last
    for key in ('optimizer', 'rng', 'scheduler'):                 # what resuming needs: last.pt only
        assert key in last and key not in best
    assert best['config']['img_size'] == 64 and best['config']['benchmark'] == 'synthetic'
    assert best['backbone_identity'] is None                       # random weights: stored by value
    assert any(k.startswith('backbone.') for k in best['model'])
    assert not list(tiny_checkpoint.parent.glob('*.tmp'))
    assert (tiny_checkpoint.parent / 'config.yaml').is_file() and (tiny_checkpoint.parent / 'log.txt').is_file()


@pytest.mark.slow
def test_imagenet_backbone_is_stored_by_identity(datapath, tmp_path, monkeypatch):
    r"""torchvision's ImageNet weights (simulated offline by a fixed state dict) are not copied into checkpoints:
    they are rebuilt and verified by content digest on load and on resume."""
    import torchvision
    from torchvision.models._api import WeightsEnum

    from engine.factory import load_model
    torch.manual_seed(5)
    fake = torchvision.models.resnet50().state_dict()
    monkeypatch.setattr(WeightsEnum, 'get_state_dict', lambda self, *a, **k: fake)
    run = tmp_path / 'lean'
    argv = [a if a != 'none' else 'imagenet' for a in TINY_TRAIN] + ['--datapath', str(datapath), '--logpath',
                                                                      str(run)]
    train_cli.main(argv)
    best = load_checkpoint(run / 'best.pt')
    assert best['backbone_identity']['weights'] == 'imagenet'
    assert not any(k.startswith('backbone.') for k in best['model'])
    assert (run / 'best.pt').stat().st_size < 15e6                # the learner (2.6 M floats), not ResNet-50
    model, _ = load_model(str(run / 'best.pt'), torch.device('cpu'))
    assert torch.equal(model.state_dict()['backbone.net.conv1.weight'], fake['conv1.weight'])
    assert torch.equal(model.state_dict()['learner.decoder2.2.weight'], best['model']['learner.decoder2.2.weight'])
    train_cli.main(['--resume', '--logpath', str(run), '--epochs', '2'])            # a lean last.pt resumes
    assert load_checkpoint(run / 'last.pt')['epoch'] == 1
    other = {k: v + 1 if v.is_floating_point() else v for k, v in fake.items()}
    monkeypatch.setattr(WeightsEnum, 'get_state_dict', lambda self, *a, **k: other)
    with pytest.raises(UserError, match='differ from the ones it was trained with'):
        load_model(str(run / 'best.pt'), torch.device('cpu'))


@pytest.mark.slow
def test_test_cli_results_and_determinism(tiny_checkpoint, datapath, tmp_path, capsys):
    common = ['--load', str(tiny_checkpoint), '--benchmark', 'synthetic-med', '--datapath', str(datapath),
              '--episodes', '8', '--seed', '5', '--bsz', '3']
    r0 = test_cli.main(common + ['--workers', '0', '--logpath', str(tmp_path / 'w0'), '--vis', '2'])
    out = capsys.readouterr().out
    assert LINE.search(out)
    saved = json.loads((tmp_path / 'w0' / 'results.json').read_text())
    for key in ('miou', 'fbiou', 'dice', 'per_class', 'nshot', 'seed', 'episodes'):
        assert key in saved
    assert saved['nshot'] == 1 and saved['seed'] == 5 and len(saved['episodes']) == 8
    assert set(saved['per_class']) == {'skin lesion', 'cell nucleus', 'cell cytoplasm', 'lung'}
    assert saved['episodes'][0].keys() == {'class', 'class_id', 'query', 'supports'}
    assert f"mIoU: {saved['miou']:.2f}" in out
    assert (tmp_path / 'w0' / 'predictions.png').stat().st_size > 1000
    r2 = test_cli.main(common + ['--workers', '2', '--logpath', str(tmp_path / 'w2')])
    assert r2['episodes'] == r0['episodes'] and r2['miou'] == r0['miou'] and r2['per_class'] == r0['per_class']


@pytest.mark.slow
def test_five_shot_runs_the_backbone_once_per_query(tiny_checkpoint, datapath, tmp_path, monkeypatch):
    from model.backbone import Backbone
    sizes = []
    original = Backbone.forward

    def counting(self, img):
        sizes.append(img.shape[0])
        return original(self, img)
    monkeypatch.setattr(Backbone, 'forward', counting)
    common = ['--load', str(tiny_checkpoint), '--benchmark', 'synthetic-med', '--datapath', str(datapath),
              '--nshot', '5', '--episodes', '4', '--bsz', '2', '--workers', '0']
    res = test_cli.main(common + ['--match-shots', 'all', '--logpath', str(tmp_path / 'all')])
    assert res['nshot'] == 5 and all(len(e['supports']) == 5 for e in res['episodes'])
    # 4 episodes in batches of 2: two backbone passes of 2 queries + 2*5 supports; no per-shot query passes
    assert sizes == [12, 12]
    sizes.clear()
    streamed = test_cli.main(common + ['--logpath', str(tmp_path / 'one')])       # CPU default: shot by shot
    # per batch: the 2 queries once, then the 2 supports of each shot just before that shot's match
    assert sizes == [2] * 6 * 2
    assert streamed['episodes'] == res['episodes'] and streamed['per_class'] == pytest.approx(res['per_class'])


def test_checkpoint_errors(tmp_path, datapath):
    args = ['--benchmark', 'synthetic-med', '--datapath', str(datapath), '--episodes', '2', '--workers', '0']
    with pytest.raises(UserError, match='does not exist'):
        test_cli.main(['--load', str(tmp_path / 'missing.pt')] + args)
    torch.save({'state_dict': {}}, tmp_path / 'foreign.pt')
    with pytest.raises(UserError, match='not a CD-TG checkpoint'):
        test_cli.main(['--load', str(tmp_path / 'foreign.pt')] + args)
    (tmp_path / 'text.pt').write_text('hello')
    with pytest.raises(UserError, match='not a readable PyTorch checkpoint'):
        test_cli.main(['--load', str(tmp_path / 'text.pt')] + args)
    save_checkpoint({'model': {'learner.bogus': torch.zeros(1)}, 'config': {'method': 'hsnet', 'backbone': 'resnet50',
                     'img_size': 64, 'benchmark': 'synthetic'}}, tmp_path / 'damaged.pt')
    with pytest.raises(UserError, match='does not fit method hsnet'):
        test_cli.main(['--load', str(tmp_path / 'damaged.pt')] + args)


def test_target_data_never_trains(datapath, tmp_path):
    with pytest.raises(UserError, match='target-domain'):
        train_cli.main(TINY_TRAIN + ['--datapath', str(datapath), '--logpath', str(tmp_path / 'a'),
                                     '--benchmark', 'synthetic-med'])
    with pytest.raises(UserError, match='model selection'):
        train_cli.main(TINY_TRAIN + ['--datapath', str(datapath), '--logpath', str(tmp_path / 'b'),
                                     '--val-benchmark', 'synthetic-med'])


@pytest.mark.slow
def test_missing_dataset_exits_cleanly():
    proc = run_script('train.py', '--benchmark', 'pascal', '--datapath', '/nonexistent', '--backbone-weights', 'none',
                      timeout=120)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    assert 'VOC2012/JPEGImages' in proc.stderr and 'SegmentationClassAug' in proc.stderr
    proc = run_script('test.py', '--load', '/nonexistent/best.pt', timeout=120)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr and '/nonexistent/best.pt' in proc.stderr


@pytest.mark.slow
def test_grid_trains_once_tests_every_cell_and_resumes(datapath, tmp_path, monkeypatch):
    import scripts.grid as grid
    argv = ['--methods', 'hsnet', '--cdtg', 'off', '--benchmark', 'synthetic', '--targets', 'synthetic-med',
            '--shots', '1', '5', '--datapath', str(datapath), '--logroot', str(tmp_path), '--episodes', '4',
            '--test-args', '--workers 0 --bsz 2', '--'] + TINY_TRAIN[4:]
    rows = grid.main(argv)
    assert [(r['method'], r['shots']) for r in rows] == [('hsnet', 1), ('hsnet', 5)]
    table = (tmp_path / 'grid.md').read_text().splitlines()
    assert len(table) == 4 and table[2].startswith('| hsnet | off |')
    for r, shots in zip(rows, (1, 5)):
        saved = json.loads((tmp_path / 'hsnet' / f'test-synthetic-med-{shots}shot' / 'results.json').read_text())
        assert round(saved['miou'], 2) == r['miou'] and saved['nshot'] == shots

    calls, run_test = [], test_cli.main
    monkeypatch.setattr(grid.test_cli, 'main', lambda cmd: calls.append(cmd) or run_test(cmd))
    assert grid.main(argv) == rows and calls == []            # a finished grid is read back, nothing re-runs
    (tmp_path / 'hsnet' / 'test-synthetic-med-5shot' / 'results.json').unlink()
    assert grid.main(argv) == rows and len(calls) == 1 and '5' in calls[0]   # only the missing cell runs


# --- -h and flag errors without torch -------------------------------------------------------------------------------
NO_TORCH = ("import runpy, sys\n"
            "for name in ('torch', 'torchvision', 'numpy', 'PIL'):\n"
            "    sys.modules[name] = None                   # any import of them now raises ImportError\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.mark.parametrize('argv, code, expect', [
    (['train.py', '-h'], 0, '--lr-schedule'),
    (['train.py', '--method', 'pmms', '-h'], 0, '--components'),           # a method's options, read from source
    (['train.py', '--method', 'dmtnet', '-h'], 0, '--grid'),
    (['train.py', '-h'], 0, '--cdtg-background'),                          # the plug-in's flags
    (['test.py', '-h'], 0, '--volumetric-support'),
    (['train.py', '--lr', '-1'], 2, '--lr must be a number > 0'),
    (['train.py', '--method', 'pmms', '--components', '0'], 2, '--components must be an integer in [1, 64]'),
    (['train.py', '--method', 'nope'], 2, "invalid choice: 'nope'"),
    (['train.py', '--clip', 'RN18'], 2, "invalid choice: 'RN18'"),
    (['test.py', '--precision', 'fp8'], 2, "invalid choice: 'fp8'"),
    (['test.py', '--episodes', '0'], 2, '--episodes must be an integer >= 1'),
])
def test_help_and_flag_errors_need_no_torch(argv, code, expect):
    r"""`-h` and flag errors answer before torch (or numpy, PIL) is imported: the child process cannot import them."""
    proc = run_script('-c', NO_TORCH, *argv, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert expect in out
    assert 'Traceback' not in out

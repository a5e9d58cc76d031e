r"""Exact resume: 2 epochs straight vs 1 epoch + --resume (and a mid-epoch checkpoint + --resume) give bit-identical
weights and optimizer state, for HSNet and PATNet, with and without CD-TG (whose style augmentation draws random
numbers) and with PMMs' image augmentation, whatever the number of loader workers."""
import warnings

import pytest
import torch

import engine.training as training
import train as train_cli
from common.checkpoint import load_checkpoint
from common.errors import UserError
from conftest import TINY_TRAIN

# a 64-d shared alignment space: a small plug-in, so tiny runs stay fast
CDTG = ['--cdtg', '--clip-weights', 'none', '--cdtg-width', '64']


def _base(datapath, method: str, cdtg: bool) -> list[str]:
    argv = [a for a in TINY_TRAIN]
    argv[argv.index('--method') + 1] = method
    argv[argv.index('--episodes-per-epoch') + 1] = '4'
    argv[argv.index('--bsz') + 1] = '2'
    argv[argv.index('--val-episodes') + 1] = '2'
    return argv + ['--datapath', str(datapath)] + (CDTG if cdtg else [])


def _train(argv):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return train_cli.main(argv)


def _assert_same_run(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a['epoch'] == b['epoch'] and a['next'] == b['next']
    assert a['model'].keys() == b['model'].keys()
    differ = [k for k, v in a['model'].items() if not torch.equal(v, b['model'][k])]
    assert differ == []
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys()
    for i in sa:
        for key, value in sa[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[i][key])), (i, key)


# one run per host (HSNet: its features; PATNet: prototypes and CD-TG's own optimiser group and style augmentation);
# HSNet with CD-TG resumes mid-epoch below
@pytest.mark.parametrize('method, cdtg, augmentation', [('hsnet', False, 'flip-resized-crop'),
                                                       ('patnet', True, 'flip-resized-crop')])
@pytest.mark.slow
def test_one_epoch_plus_resume_equals_two_epochs(datapath, tmp_path, method, cdtg, augmentation):
    base = _base(datapath, method, cdtg) + ['--augmentation', augmentation]
    straight = tmp_path / 'straight'
    _train(base + ['--workers', '0', '--epochs', '2', '--logpath', str(straight)])
    split = tmp_path / 'split'
    _train(base + ['--workers', '2', '--epochs', '1', '--logpath', str(split)])      # other worker counts, too
    with pytest.raises(UserError, match='--bsz'):                                      # typed, even at its default
        train_cli.main(['--resume', '--logpath', str(split), '--epochs', '2', '--bsz', '20'])
    _train(['--resume', '--logpath', str(split), '--epochs', '2', '--workers', '2'])
    _assert_same_run(straight / 'last.pt', split / 'last.pt')
    log = (split / 'log.txt').read_text()
    assert 'resumed from epoch 1' in log


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_mid_epoch_checkpoint_resumes_at_the_exact_step(datapath, tmp_path, monkeypatch):
    base = _base(datapath, 'hsnet', True)
    base[base.index('--episodes-per-epoch') + 1] = '8'                                 # 4 steps per epoch
    straight = tmp_path / 'straight'
    _train(base + ['--epochs', '1', '--logpath', str(straight)])
    split = tmp_path / 'split'
    saves = []
    real_save = training.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        saves.append(state['next'])
        if state['next'] == (0, 2):
            raise Interrupt                                                               # "killed" after step 2
    monkeypatch.setattr(training, 'save_checkpoint', save_then_die)
    with pytest.raises(Interrupt):
        _train(base + ['--epochs', '1', '--save-every-steps', '1', '--logpath', str(split)])
    assert saves == [(0, 1), (0, 2)]
    monkeypatch.setattr(training, 'save_checkpoint', real_save)
    _train(['--resume', '--logpath', str(split)])
    assert 'resumed from epoch 0, step 2' in (split / 'log.txt').read_text()
    _assert_same_run(straight / 'last.pt', split / 'last.pt')

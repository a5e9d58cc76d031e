r"""torchrun with 2 CPU processes (gloo): test.py gives the same scores as one process, training over the same
episodes gives the same weights (to float tolerance), rank 0 alone writes files, and --resume works with another
number of processes."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import test as test_cli
import train as train_cli
from common.checkpoint import load_checkpoint
from conftest import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', script] + argv
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def quiet(main, argv):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return main(argv)


@pytest.mark.slow
def test_two_processes_train_test_and_resume_like_one(datapath, tmp_path):
    base = TINY_TRAIN + ['--datapath', str(datapath), '--episodes-per-epoch', '8', '--val-episodes', '4']
    # training: 2 steps of a global batch of 4 = 2 processes x 2 episodes, the same episodes as one process
    torchrun('train.py', base + ['--logpath', str(tmp_path / 'ddp')])
    quiet(train_cli.main, base + ['--logpath', str(tmp_path / 'one')])
    a, b = load_checkpoint(tmp_path / 'ddp' / 'last.pt'), load_checkpoint(tmp_path / 'one' / 'last.pt')
    assert a['world_size'] == 2 and b['world_size'] == 1
    # Adam normalises each gradient entry, so float-rounding differences of near-zero gradients (summed in another
    # order across processes) show up as ~1e-5 changes in a few entries; one step moves weights by up to lr = 1e-3
    changed, total = 0, 0
    for key, value in b['model'].items():
        diff = (a['model'][key].double() - value.double()).abs()
        assert diff.max() < 5e-5, key
        changed, total = changed + int((diff > 1e-6).sum()), total + diff.numel()
    assert changed < 1e-3 * total
    assert a['val']['miou'] == b['val']['miou'] and abs(a['val']['loss'] - b['val']['loss']) < 1e-5
    assert sorted(p.name for p in (tmp_path / 'ddp').iterdir()) == sorted(p.name for p in (tmp_path / 'one').iterdir())
    assert (tmp_path / 'ddp' / 'log.txt').read_text().count('epoch   0 |') == 1          # rank 0 alone logs

    # testing: the episode list split over 2 processes, sums all-reduced -> the same scores as one process
    args = ['--load', str(tmp_path / 'ddp' / 'best.pt'), '--benchmark', 'synthetic-med', '--datapath', str(datapath),
            '--episodes', '7', '--nshot', '2', '--workers', '0', '--bsz', '2']
    proc = torchrun('test.py', args + ['--logpath', str(tmp_path / 'test-ddp')])
    single = quiet(test_cli.main, args + ['--logpath', str(tmp_path / 'test-one')])
    two = json.loads((tmp_path / 'test-ddp' / 'results.json').read_text())
    for key in ('miou', 'fbiou', 'dice', 'per_class', 'per_class_dice', 'episodes_per_class', 'episodes'):
        assert two[key] == single[key], key
    assert two['world_size'] == 2 and two['episodes_per_rank'] == [4, 3] and single['world_size'] == 1
    line = [x for x in proc.stdout.splitlines() if x.startswith('mIoU:')]
    assert line == [f"mIoU: {single['miou']:.2f}  FB-IoU: {single['fbiou']:.2f}  Dice: {single['dice']:.2f}"]

    # resume a 2-process run with one process (and the other way round is the same code path)
    quiet(train_cli.main, ['--resume', '--logpath', str(tmp_path / 'ddp'), '--epochs', '2'])
    assert load_checkpoint(tmp_path / 'ddp' / 'last.pt')['next'] == (2, 0)

r"""The bad-input catalogue: every case a user meets (flags out of range, bad YAML, unwritable folders, foreign,
crafted, truncated, corrupted and diverged checkpoints, NaN training, disk full, a kill between write and rename,
garbage masks). Each case asserts: the exit code (non-zero where it must fail), no "Traceback" in the output, the
flag or path named in the message, and that no earlier checkpoint was modified. docs/troubleshooting.md lists the
same messages."""
import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test as test_cli
import train as train_cli
from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import run_cli
from conftest import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]
CDTG = ['--cdtg', '--clip-weights', 'none']


def run(main, argv, capsys) -> tuple[int, str]:
    r"""Run a CLI entry point as the command line does; returns (exit code, stdout + stderr)."""
    code = 0
    with warnings.catch_warnings():
        warnings.simplefilter('default')                      # warnings are part of what a user sees
        try:
            run_cli(lambda: main(argv))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def env(datapath, tiny_checkpoint, tmp_path_factory):
    r"""Shared material: the tiny checkpoint (never to be modified by any case), its damaged variants, a file to put
    folders under, a NaN checkpoint, an old-format checkpoint, a crafted pickle."""
    root = tmp_path_factory.mktemp('bad')
    ckpt = load_checkpoint(tiny_checkpoint)
    state = {k: v for k, v in ckpt.items() if k not in ('format', 'version', 'checksum')}
    save_checkpoint(state, root / 'good.pt')
    nan = dict(state, model={k: (torch.full_like(v, float('nan')) if v.is_floating_point() and 'learner' in k else v)
                              for k, v in state['model'].items()})
    torch.save(dict(nan, format='cdtg-checkpoint', version=2), root / 'nan.pt')   # as a diverged old run wrote it
    data = (root / 'good.pt').read_bytes()
    (root / 'truncated.pt').write_bytes(data[:len(data) // 2])
    flipped = bytearray(data)
    # flip one byte inside the largest tensor's payload (the end of the zip holds the directory)
    flipped[len(flipped) // 2] ^= 0x40
    (root / 'flipped.pt').write_bytes(bytes(flipped))
    rng = load_checkpoint(tiny_checkpoint.parent / 'last.pt')['rng']
    old = dict(state, format='cdtg-checkpoint', version=1, rng=dict(rng, numpy=np.random.get_state()))
    torch.save(old, root / 'old.pt')
    marker = root / 'PWNED'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    with open(root / 'crafted.pt', 'wb') as f:
        pickle.dump({'format': 'cdtg-checkpoint', 'model': Payload(), 'config': {}}, f)
    torch.save({'state_dict': {}}, root / 'foreign.pt')
    (root / 'text.pt').write_text('hello')
    (root / 'a_file').write_text('not a folder')
    (root / 'yaml_float.yaml').write_text('log-every: 2.5\n')
    (root / 'yaml_unknown.yaml').write_text('batch_size: 2\n')
    (root / 'yaml_list.yaml').write_text('- 1\n- 2\n')
    (root / 'yaml_bad.yaml').write_text('bsz: [1\n')
    (root / 'yaml_str.yaml').write_text('lr: fast\n')
    # a run folder whose default test output folder cannot be created (a file is in the way)
    blocked = root / 'blocked'
    blocked.mkdir()
    shutil.copy(root / 'good.pt', blocked / 'best.pt')
    (blocked / 'test-synthetic-med-1shot-seed0').write_text('a file, not a folder')
    return {'root': root, 'data': str(datapath), 'good': root / 'good.pt', 'reference': tiny_checkpoint,
            'marker': marker, 'blocked': blocked}


def train_argv(env, *extra, logpath='run'):
    return TINY_TRAIN + ['--datapath', env['data'], '--logpath', str(env['root'] / logpath)] + list(extra)


def eval_argv(env, *extra, load=None):
    return ['--load', str(load or env['good']), '--benchmark', 'synthetic-med', '--datapath', env['data'],
            '--episodes', '2', '--workers', '0', '--logpath', str(env['root'] / 'test-out')] + list(extra)


# (id, cli, argv builder, expected exit code, text the output must contain)
CASES = [
    # --- train.py: numeric flags out of range --------------------------------------------------------------------
    ('lr-negative', 'train', lambda e: train_argv(e, '--lr', '-1'), 2, '--lr must be a number > 0'),
    ('lr-zero', 'train', lambda e: train_argv(e, '--lr', '0'), 2, '--lr must be a number > 0'),
    ('lr-nan', 'train', lambda e: train_argv(e, '--lr', 'nan'), 2, '--lr must be a finite number'),
    ('lr-inf', 'train', lambda e: train_argv(e, '--lr', 'inf'), 2, '--lr must be a finite number'),
    ('lr-text', 'train', lambda e: train_argv(e, '--lr', 'fast'), 2, '--lr'),
    ('workers-negative', 'train', lambda e: train_argv(e, '--workers', '-1'), 2, '--workers must be an integer >= 0'),
    ('seed-negative', 'train', lambda e: train_argv(e, '--seed', '-1'), 2, '--seed must be an integer in [0'),
    ('log-every-zero', 'train', lambda e: train_argv(e, '--log-every', '0'), 2, '--log-every must be an integer >= 1'),
    ('episodes-per-epoch-negative', 'train', lambda e: train_argv(e, '--episodes-per-epoch', '-3'), 2,
     '--episodes-per-epoch must be an integer >= 1'),
    ('bsz-zero', 'train', lambda e: train_argv(e, '--bsz', '0'), 2, '--bsz must be an integer >= 1'),
    ('epochs-zero', 'train', lambda e: train_argv(e, '--epochs', '0'), 2, '--epochs must be an integer >= 1'),
    ('nshot-zero', 'train', lambda e: train_argv(e, '--nshot', '0'), 2, '--nshot must be an integer >= 1'),
    ('img-size-zero', 'train', lambda e: train_argv(e, '--img-size', '0'), 2, '--img-size must be an integer in [32'),
    ('img-size-tiny', 'train', lambda e: train_argv(e, '--img-size', '17'), 2, '--img-size must be an integer in [32'),
    ('val-episodes-zero', 'train', lambda e: train_argv(e, '--val-episodes', '0'), 2, '--val-episodes'),
    ('bn-calibration-negative', 'train', lambda e: train_argv(e, '--bn-calibration', '-5'), 2, '--bn-calibration'),
    ('save-every-negative', 'train', lambda e: train_argv(e, '--save-every-steps', '-1'), 2, '--save-every-steps'),
    ('skip-nonfinite-negative', 'train', lambda e: train_argv(e, '--skip-nonfinite', '-2'), 2, '--skip-nonfinite'),
    ('alpha-above-one', 'train', lambda e: train_argv(e, *CDTG, '--alpha', '1.5'), 2, '--alpha'),
    ('text-lora-negative', 'train', lambda e: train_argv(e, *CDTG, '--text-lora', '-1'), 2, '--text-lora'),
    ('unknown-method', 'train', lambda e: train_argv(e, '--method', 'nope'), 2, '--method'),
    ('unknown-backbone', 'train', lambda e: train_argv(e, '--backbone', 'resnet18'), 2, '--backbone'),
    ('unknown-transform', 'train', lambda e: train_argv(e, '--method', 'patnet', '--transform', 'svd'), 2,
     '--transform'),
    # --- train.py: configuration files -----------------------------------------------------------------------------
    ('yaml-float-for-int', 'train', lambda e: train_argv(e, '--config', str(e['root'] / 'yaml_float.yaml')), 2,
     '--log-every must be an integer, got 2.5'),
    ('yaml-unknown-key', 'train', lambda e: train_argv(e, '--config', str(e['root'] / 'yaml_unknown.yaml')), 2,
     "unknown key 'batch_size'"),
    ('yaml-not-a-mapping', 'train', lambda e: train_argv(e, '--config', str(e['root'] / 'yaml_list.yaml')), 2,
     'must hold a mapping'),
    ('yaml-invalid', 'train', lambda e: train_argv(e, '--config', str(e['root'] / 'yaml_bad.yaml')), 2,
     'is not valid YAML'),
    ('yaml-string-for-float', 'train', lambda e: train_argv(e, '--config', str(e['root'] / 'yaml_str.yaml')), 2,
     '--lr'),
    ('yaml-missing', 'train', lambda e: train_argv(e, '--config', str(e['root'] / 'none.yaml')), 2, 'none.yaml'),
    # --- train.py: data, folders, resume -----------------------------------------------------------------------------
    ('target-benchmark', 'train', lambda e: train_argv(e, '--benchmark', 'synthetic-med'), 2, 'target-domain'),
    ('missing-datapath', 'train', lambda e: train_argv(e, '--benchmark', 'pascal', '--datapath', '/nonexistent'), 2,
     '/nonexistent'),
    ('logpath-under-a-file', 'train', lambda e: train_argv(e, logpath='a_file/run'), 2, '--logpath'),
    ('logpath-under-proc', 'train', lambda e: TINY_TRAIN + ['--datapath', e['data'], '--logpath', '/proc/cdtg-run'],
     2, '/proc/cdtg-run'),
    ('resume-without-logpath', 'train', lambda e: ['--resume'], 2, '--resume needs the --logpath'),
    ('resume-empty-folder', 'train', lambda e: ['--resume', '--logpath', str(e['root'] / 'empty')], 2,
     'holds no last.pt'),
    ('resume-changed-bsz-default', 'train', lambda e: ['--resume', '--logpath', str(e['reference'].parent), '--bsz',
                                                        '20'], 2, '--bsz'),
    ('resume-changed-lr', 'train', lambda e: ['--resume', '--logpath', str(e['reference'].parent), '--lr', '0.5'],
     2, '--lr'),
    ('existing-run-without-resume', 'train', lambda e: TINY_TRAIN + ['--datapath', e['data'], '--logpath',
                                                                      str(e['reference'].parent)], 2, '--resume'),
    # --- test.py: flags -----------------------------------------------------------------------------------------------
    ('test-img-size-negative', 'test', lambda e: eval_argv(e, '--img-size', '-5'), 2, '--img-size'),
    ('test-img-size-zero', 'test', lambda e: eval_argv(e, '--img-size', '0'), 2, '--img-size'),
    ('test-img-size-one', 'test', lambda e: eval_argv(e, '--img-size', '1'), 2, '--img-size'),
    ('test-nshot-zero', 'test', lambda e: eval_argv(e, '--nshot', '0'), 2, '--nshot'),
    ('test-episodes-zero', 'test', lambda e: eval_argv(e, '--episodes', '0'), 2, '--episodes'),
    ('test-bsz-zero', 'test', lambda e: eval_argv(e, '--bsz', '0'), 2, '--bsz'),
    ('test-seed-negative', 'test', lambda e: eval_argv(e, '--seed', '-1'), 2, '--seed'),
    ('test-workers-negative', 'test', lambda e: eval_argv(e, '--workers', '-1'), 2, '--workers'),
    ('test-finetune-steps-negative', 'test', lambda e: eval_argv(e, '--finetune-steps', '-1'), 2, '--finetune-steps'),
    ('test-finetune-lr-zero', 'test', lambda e: eval_argv(e, '--finetune-lr', '0'), 2, '--finetune-lr'),
    ('test-finetune-on-hsnet', 'test', lambda e: eval_argv(e, '--finetune-steps', '3'), 2,
     'HSNet has no test-time adaptation'),
    ('test-alpha-on-plain', 'test', lambda e: eval_argv(e, '--alpha', '0.5'), 2, '--alpha'),
    ('test-cdtg-on-plain', 'test', lambda e: eval_argv(e, '--cdtg'), 2, '--cdtg'),
    ('test-volumetric-on-2d', 'test', lambda e: eval_argv(e, '--protocol', 'volumetric'), 2, '--protocol volumetric'),
    ('test-strict-shots', 'test', lambda e: eval_argv(e, '--nshot', '60', '--strict-shots'), 2, '--strict-shots'),
    ('test-load-missing', 'test', lambda e: eval_argv(e, load=e['root'] / 'missing.pt'), 2, 'missing.pt'),
    # --- test.py: checkpoints -----------------------------------------------------------------------------------------
    ('load-run-folder', 'test', lambda e: eval_argv(e, load=e['reference'].parent), 2, 'is a run folder; pass'),
    ('load-text-file', 'test', lambda e: eval_argv(e, load=e['root'] / 'text.pt'), 2, 'text.pt'),
    ('load-foreign-torch-file', 'test', lambda e: eval_argv(e, load=e['root'] / 'foreign.pt'), 2,
     'not a CD-TG checkpoint'),
    ('load-crafted-pickle', 'test', lambda e: eval_argv(e, load=e['root'] / 'crafted.pt'), 2, 'crafted.pt'),
    ('load-truncated', 'test', lambda e: eval_argv(e, load=e['root'] / 'truncated.pt'), 2, 'truncated.pt'),
    ('load-flipped-byte', 'test', lambda e: eval_argv(e, load=e['root'] / 'flipped.pt'), 2, 'flipped.pt'),
    ('load-old-format', 'test', lambda e: eval_argv(e, load=e['root'] / 'old.pt'), 2, 'convert_checkpoint.py'),
    ('load-nan-weights', 'test', lambda e: eval_argv(e, load=e['root'] / 'nan.pt'), 2, 'NaN/inf weights'),
    ('default-logpath-blocked', 'test', lambda e: eval_argv(e, load=e['blocked'] / 'best.pt')[:-2], 2,
     'test-synthetic-med-1shot-seed0'),
    ('test-logpath-under-a-file', 'test', lambda e: eval_argv(e)[:-2] + ['--logpath', str(e['root'] / 'a_file/x')],
     2, '--logpath'),
]


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_bad_input(case, env, capsys):
    name, cli, argv, code, expected = case
    main = {'train': train_cli.main, 'test': test_cli.main}[cli]
    before = digest(env['reference'])
    exit_code, out = run(main, argv(env), capsys)
    assert exit_code == code, out
    assert 'Traceback' not in out
    assert expected in out, out
    assert digest(env['reference']) == before                          # no earlier checkpoint modified
    if name == 'load-crafted-pickle':
        assert not env['marker'].exists()                              # nothing in the file ran
    if name == 'load-flipped-byte':
        assert 'corrupt' in out or 'not a readable' in out


def test_catalogue_has_at_least_50_cases():
    assert len(CASES) + len(EXTRA_CASES) >= 50


# --- cases that need more than one command --------------------------------------------------------------------------
EXTRA_CASES = ['nan-training', 'skip-nonfinite', 'disk-full', 'kill-between-write-and-rename', 'fss-zero-one-masks',
               'empty-support-masks', 'pascal-colour-masks', 'repeated-supports', 'warnings-in-log']


@pytest.mark.slow
def test_nan_training_stops_at_the_first_non_finite_step_and_writes_no_nan_checkpoint(env, capsys):
    argv = train_argv(env, '--lr', '1e8', '--episodes-per-epoch', '16', '--bsz', '2', '--epochs', '2',
                      logpath='nan-run')
    code, out = run(train_cli.main, argv, capsys)
    assert code == 2 and 'Traceback' not in out
    assert 'NaN/inf at epoch 0, step' in out and '--lr' in out
    run_dir = env['root'] / 'nan-run'
    if (run_dir / 'last.pt').exists():                  # the message names what exists on disk, nothing else
        assert f'({run_dir / "last.pt"}) is intact' in out
    else:
        assert 'No checkpoint was written' in out and 'last.pt) is intact' not in out
    for name in ('best.pt', 'last.pt'):                                 # nothing diverged was ever written
        assert not (run_dir / name).exists() or not any(
            torch.isnan(v).any() for v in load_checkpoint(run_dir / name)['model'].values() if v.is_floating_point())
    assert 'NaN/inf' in (run_dir / 'log.txt').read_text()


@pytest.mark.slow
def test_skip_nonfinite_skips_with_a_warning(env, capsys, monkeypatch):
    import engine.loops as loops
    real = loops.total_loss
    calls = []

    def poisoned(terms):
        calls.append(1)
        loss = real(terms)
        return loss * float('nan') if len(calls) == 2 else loss       # the second step's loss is NaN
    monkeypatch.setattr(loops, 'total_loss', poisoned)
    argv = train_argv(env, '--skip-nonfinite', '1', '--episodes-per-epoch', '6', '--bsz', '2', logpath='skip-run')
    code, out = run(train_cli.main, argv, capsys)
    assert code == 0 and 'step skipped (1 of --skip-nonfinite 1)' in out
    assert 'step skipped' in (env['root'] / 'skip-run' / 'log.txt').read_text()   # warnings reach log.txt
    ckpt = load_checkpoint(env['root'] / 'skip-run' / 'last.pt', require_finite=True)
    assert ckpt['epoch'] == 0


@pytest.mark.slow
def test_disk_full_keeps_the_previous_checkpoint_and_says_how_much_space(env, capsys, monkeypatch):
    run_dir = env['root'] / 'disk-run'
    code, _ = run(train_cli.main, train_argv(env, logpath='disk-run'), capsys)
    assert code == 0
    before = digest(run_dir / 'last.pt')

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full)
    code, out = run(train_cli.main, ['--resume', '--logpath', str(run_dir), '--epochs', '2'], capsys)
    assert code == 2 and 'Traceback' not in out
    assert 'disk full while writing' in out and 'MiB' in out and str(run_dir) in out
    assert digest(run_dir / 'last.pt') == before
    assert not list(run_dir.glob('.*.tmp'))                               # the partial file is gone


@pytest.mark.slow
def test_kill_between_write_and_rename_leaves_a_loadable_run(env, tmp_path):
    r"""A process killed right after writing the temp file (before the rename): the old last.pt survives, the
    next start removes the temp file and resumes."""
    run_dir = tmp_path / 'kill-run'
    argv = train_argv(env, logpath=str(run_dir))
    # SIGKILL at the second rename into last.pt (epoch 1), after its temp file was written
    script = ('import os, signal, sys\nsys.path.insert(0, %r)\nimport train\nreal = os.replace\ncount = [0]\n'
              'def replace(a, b):\n    count[0] += str(b).endswith("last.pt")\n    if count[0] == 2:\n'
              '        os.kill(os.getpid(), signal.SIGKILL)\n    real(a, b)\nos.replace = replace\ntrain.main(%r)\n'
              ) % (str(ROOT), argv + ['--epochs', '2'])
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert list(run_dir.glob('.last.pt.*.tmp'))                         # the interrupted save's temp file
    first = load_checkpoint(run_dir / 'last.pt')                        # the previous save is intact
    assert first['epoch'] == 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train_cli.main(['--resume', '--logpath', str(run_dir), '--epochs', '2'])
    assert not list(run_dir.glob('.*.tmp'))
    assert load_checkpoint(run_dir / 'last.pt')['epoch'] == 1
    assert 'removed 1 temp file' in (run_dir / 'log.txt').read_text()


def test_checkpoints_follow_the_umask(env, tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint({'model': {'w': torch.zeros(1)}, 'config': {}}, tmp_path / 'x.pt')
    finally:
        os.umask(old)
    assert (tmp_path / 'x.pt').stat().st_mode & 0o777 == 0o644


def test_zero_one_masks_are_recognised_not_binarised_to_empty(tmp_path, capsys):
    from data import build_dataset
    from fixtures_targets import write_fss
    write_fss(tmp_path)
    for mask in tmp_path.rglob('*.png'):                                 # recode every mask 0/255 -> 0/1
        arr = np.asarray(Image.open(mask).convert('L'))
        Image.fromarray((arr >= 128).astype(np.uint8)).save(mask)
    ds = build_dataset('fss', tmp_path, 'test', 1, 64)
    ep = ds.sample_episodes(1, 0)[0]
    assert ds.read_mask(ep.query, ep.class_id).sum() > 0
    code, out = run(lambda argv: __import__('scripts.check_data', fromlist=['main']).main(argv),
                    ['--benchmark', 'fss', '--datapath', str(tmp_path)], capsys)
    assert 'coded 0/1' in out and 'Traceback' not in out


@pytest.mark.slow
def test_empty_support_masks_are_reported_and_warned(env, tmp_path, capsys, monkeypatch):
    from data.synthetic import SyntheticMed
    real = SyntheticMed.read_mask

    def empty_supports(self, key, class_id):
        mask = real(self, key, class_id)
        return mask * 0 if key.endswith('1') else mask
    monkeypatch.setattr(SyntheticMed, 'read_mask', empty_supports)
    code, out = run(test_cli.main, eval_argv(env, '--episodes', '8'), capsys)
    assert code == 0 and 'support masks have no foreground' in out
    results = json.loads((env['root'] / 'test-out' / 'results.json').read_text())
    assert results['empty_support_masks'] > 0


def test_pascal_colour_masks_are_refused(tmp_path):
    from common.errors import UserError
    from data.pascal import class_mask
    path = tmp_path / '2007_000001.png'
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)
    with pytest.raises(UserError, match='2007_000001.png: values 128'):
        class_mask(path, 0, 20)


@pytest.mark.slow
def test_repeated_supports_are_warned_and_recorded(env, capsys):
    code, out = run(test_cli.main, eval_argv(env, '--nshot', '60', '--episodes', '2'), capsys)
    assert code == 0 and 'supports repeat' in out
    results = json.loads((env['root'] / 'test-out' / 'results.json').read_text())
    assert sum(results['repeated_supports'].values()) == 2 and results['nshot'] == 60


# --- predict.py and run folders: nothing a user gives is lost or silently misread ----------------------------------
def folder_digest(folder: Path) -> dict:
    r"""relative path -> sha256 of every file under `folder` (what must be byte-identical after a refused run)."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob('*')) if p.is_file()}


def _photo(rng, h: int, w: int) -> np.ndarray:
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = (230, 40, 40)
    return img


def _box(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    return mask


@pytest.fixture
def user(tmp_path):
    r"""A user's folder V: one support (s1.jpg + s1_mask.png) and two query photos in V/q."""
    rng = np.random.default_rng(0)
    root = tmp_path / 'V'
    (root / 'q').mkdir(parents=True)
    Image.fromarray(_photo(rng, 48, 64)).save(root / 's1.jpg')
    Image.fromarray(_box(48, 64)).save(root / 's1_mask.png')
    for name in ('a.jpg', 'b.png'):
        Image.fromarray(_photo(rng, 40, 56)).save(root / 'q' / name)
    return root


def predict_argv(user: Path, ckpt, *extra, out=None, query=None, supports=None) -> list[str]:
    supports = supports or [f'{user}/s1.jpg:{user}/s1_mask.png']
    argv = ['--load', str(ckpt), '--query', str(query or user / 'q'), '--device', 'cpu']
    for s in supports:
        argv += ['--support', s]
    return argv + ['--out', str(out if out is not None else user.parent / 'preds')] + list(extra)


def _predict():
    import predict
    return predict.main


# (id, argv builder (user folder, checkpoint), text the message must contain)
PREDICT_REFUSALS = [
    ('out-is-the-query-folder', lambda u, c: predict_argv(u, c, '--overwrite', out=u / 'q'), 'is the input --query'),
    ('out-above-the-inputs', lambda u, c: predict_argv(u, c, '--overwrite', out=u), 'contains the input'),
    ('out-inside-the-query-folder', lambda u, c: predict_argv(u, c, out=u / 'q' / 'preds'), 'lies inside the input'),
    ('out-holds-the-checkpoint', lambda u, c: predict_argv(u, c, '--overwrite', out=Path(c).parent),
     'contains the input --load'),
    ('out-is-a-support-file', lambda u, c: predict_argv(u, c, out=u / 's1_mask.png'), 'is a file'),
    ('out-under-a-file', lambda u, c: predict_argv(u, c, out=u / 's1.jpg' / 'sub'), 'lies under the file'),
    ('out-name-too-long', lambda u, c: predict_argv(u, c, out=u.parent / ('n' * 300)), 'for one name'),
    ('out-path-too-long', lambda u, c: predict_argv(u, c, out=u.parent.joinpath(*['p' * 200] * 25)),
     'too close to'),
    ('overwrite-a-folder-predict-did-not-write', lambda u, c: predict_argv(u, c, '--overwrite', out=u.parent / 'mine'),
     'did not write'),
    ('nan-float-query', lambda u, c: predict_argv(u, c, query=u.parent / 'nan.tif'), 'nan.tif has 16 NaN/inf'),
    ('strict-all-foreground-support', lambda u, c: predict_argv(
        u, c, '--strict-shots', supports=[f'{u}/s1.jpg:{u.parent}/full_mask.png']), 'foreground everywhere'),
    ('strict-repeated-support', lambda u, c: predict_argv(
        u, c, '--strict-shots', supports=[f'{u}/s1.jpg:{u}/s1_mask.png'] * 2), 'the same support as'),
    ('strict-tiny-support-image', lambda u, c: predict_argv(
        u, c, '--strict-shots', supports=[f'{u.parent}/tiny.png:{u.parent}/tiny_mask.png']), 'side under 32'),
]


@pytest.mark.parametrize('case', PREDICT_REFUSALS, ids=[c[0] for c in PREDICT_REFUSALS])
@pytest.mark.slow
def test_predict_refuses_before_any_work_and_leaves_inputs_untouched(case, user, tiny_checkpoint, capsys):
    rng = np.random.default_rng(1)
    side = user.parent
    (side / 'mine').mkdir()
    (side / 'mine' / 'notes.txt').write_text('not written by predict.py')
    nan = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    nan[:4, :4] = np.nan
    Image.fromarray(nan, mode='F').save(side / 'nan.tif')
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(side / 'full_mask.png')
    Image.fromarray(_photo(rng, 20, 24)).save(side / 'tiny.png')
    Image.fromarray(_box(20, 24)).save(side / 'tiny_mask.png')
    before, ckpt_before = folder_digest(side), digest(tiny_checkpoint)
    _, argv, expected = case
    code, out = run(_predict(), argv(user, tiny_checkpoint), capsys)
    assert code == 2 and 'Traceback' not in out and expected in out, out
    assert folder_digest(side) == before and digest(tiny_checkpoint) == ckpt_before     # every input byte-identical
    assert not (side / 'preds').exists()


@pytest.mark.slow
def test_predict_overwrite_replaces_only_its_own_files(user, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / 'preds'
    code, text = run(_predict(), predict_argv(user, tiny_checkpoint, out=out), capsys)
    assert code == 0, text
    first = folder_digest(out)
    assert 'masks/a.png' in first and '.written-by.json' in first
    (out / 'masks' / 'mine.txt').write_text('a note the user put there')
    (out / 'README').write_text('also theirs')
    code, text = run(_predict(), predict_argv(user, tiny_checkpoint, out=out), capsys)
    assert code == 2 and '--overwrite' in text                                       # not without the flag
    code, text = run(_predict(), predict_argv(user, tiny_checkpoint, '--overwrite', out=out), capsys)
    assert code == 0, text
    assert (out / 'masks' / 'mine.txt').read_text() == 'a note the user put there'
    assert (out / 'README').read_text() == 'also theirs' and (out / 'masks' / 'a.png').is_file()
    (out / 'masks' / 'a.png').unlink()
    (out / 'masks' / 'a.png').write_text('the user replaced our mask by something of theirs')   # still listed
    code, text = run(_predict(), predict_argv(user, tiny_checkpoint, '--overwrite', out=out), capsys)
    assert code == 0 and Image.open(out / 'masks' / 'a.png').size == (56, 40)          # listed files are ours


@pytest.mark.slow
def test_predict_out_dot(user, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(user / 'q')                       # "." holds the queries: refused up front
    code, out = run(_predict(), predict_argv(user, tiny_checkpoint, '--overwrite', out='.'), capsys)
    assert code == 2 and 'is the input --query' in out and 'Traceback' not in out
    empty = tmp_path / 'empty'
    empty.mkdir()
    monkeypatch.chdir(empty)                            # an empty "." works
    code, out = run(_predict(), predict_argv(user, tiny_checkpoint, out='.'), capsys)
    assert code == 0, out
    assert (empty / 'masks' / 'a.png').is_file() and (empty / 'summary.json').is_file()


@pytest.mark.slow
def test_predict_reads_images_as_a_person_sees_them(user, tiny_checkpoint, tmp_path, capsys):
    r"""An EXIF-rotated JPEG gives a mask of its displayed size; a float TIFF in 0-1 the same mask as its 8-bit
    version; a red-on-black RGB support mask and a transparent RGBA annotation read as their foreground."""
    rng = np.random.default_rng(2)
    q = tmp_path / 'odd'
    q.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6                                    # stored 60x40 (w x h), displayed rotated: 40x60
    Image.fromarray(_photo(rng, 40, 60)).save(q / 'phone.jpg', exif=exif)
    gray = rng.integers(0, 256, (36, 52), dtype=np.uint8)
    Image.fromarray(gray).save(q / 'eight.png')
    Image.fromarray(gray.astype(np.float32) / 255, mode='F').save(q / 'float.tif')
    red = np.zeros((48, 64, 3), np.uint8)
    red[_box(48, 64) > 0] = (255, 0, 0)                 # reads as gray 76: refused as empty before
    Image.fromarray(red).save(tmp_path / 'red_mask.png')
    layer = np.zeros((48, 64, 4), np.uint8)
    layer[_box(48, 64) > 0] = (0, 0, 0, 255)            # black strokes on a transparent layer
    Image.fromarray(layer).save(tmp_path / 'layer_mask.png')
    out = tmp_path / 'preds'
    code, text = run(_predict(), predict_argv(user, tiny_checkpoint, query=q, out=out, supports=[
        f'{user}/s1.jpg:{tmp_path}/red_mask.png', f'{user}/s1.jpg:{tmp_path}/layer_mask.png']), capsys)
    assert code == 0, text
    assert Image.open(out / 'masks' / 'phone.png').size == (40, 60)
    assert np.array_equal(np.asarray(Image.open(out / 'masks' / 'float.png')),
                          np.asarray(Image.open(out / 'masks' / 'eight.png')))
    summary = json.loads((out / 'summary.json').read_text())
    assert [s['foreground_fraction'] for s in summary['supports']] == [0.25, 0.25]
    assert summary['degenerate_supports']['repeated'] == 1                # the same image, the same mask pixels
    assert summary['test_time_adaptation'] is None                      # HSNet does not adapt


@pytest.mark.slow
def test_predict_warns_about_degenerate_supports_and_counts_them(user, tiny_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(3)
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(tmp_path / 'full_mask.png')
    speck = np.zeros((48, 64), np.uint8)
    speck[20:23, 30:33] = 255                           # 9 pixels: a few more at the model's 64x64
    Image.fromarray(speck).save(tmp_path / 'speck_mask.png')
    Image.fromarray(_photo(rng, 20, 24)).save(tmp_path / 'tiny.png')
    Image.fromarray(_box(20, 24)).save(tmp_path / 'tiny_mask.png')
    out = tmp_path / 'preds'
    code, text = run(_predict(), predict_argv(user, tiny_checkpoint, out=out, supports=[
        f'{user}/s1.jpg:{tmp_path}/full_mask.png', f'{user}/s1.jpg:{tmp_path}/speck_mask.png',
        f'{tmp_path}/tiny.png:{tmp_path}/tiny_mask.png', f'{user}/s1.jpg:{user}/s1_mask.png',
        f'{user}/s1.jpg:{user}/s1_mask.png']), capsys)
    assert code == 0, text
    for words in ('foreground everywhere', 'foreground pixels at 64x64 (fewer than 16)', 'side under 32',
                  'the same support as'):
        assert words in text, words
    assert all(line.startswith('warning: ') for line in text.splitlines() if 'support' in line and 'warn' in line)
    counts = json.loads((out / 'summary.json').read_text())['degenerate_supports']
    assert counts == {'all_foreground': 1, 'few_foreground': 1, 'small_image': 1, 'repeated': 1}


@pytest.mark.slow
def test_a_second_run_on_a_live_folder_stops_at_once_and_no_lock_outlives_its_process(env, capsys):
    run_dir = env['root'] / 'locked-run'
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from common.runlock import RunLock; '
                               f'RunLock({str(run_dir)!r}, "train.py (holder)"); print("locked", flush=True); '
                               'time.sleep(120)'], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        for main, argv in ((train_cli.main, train_argv(env, logpath='locked-run')),
                           (test_cli.main, eval_argv(env)[:-1] + [str(run_dir)])):
            code, out = run(main, argv, capsys)
            assert code == 2 and 'Traceback' not in out and f'PID {holder.pid}' in out and str(run_dir) in out
        assert not (run_dir / 'config.yaml').exists()                    # the second run wrote nothing
    finally:
        holder.kill()                                                   # kill -9: no chance to clean up
        holder.wait()
    code, out = run(train_cli.main, train_argv(env, logpath='locked-run'), capsys)
    assert code == 0, out                                               # no stale lock
    assert (run_dir / 'best.pt').is_file()


OUTPUT_REFUSALS = [
    ('train-logpath-inside-datapath', 'train', lambda e: train_argv(e)[:-1] + [str(Path(e['data']) / 'logs')],
     'lies inside the input --datapath'),
    ('train-logpath-name-too-long', 'train', lambda e: train_argv(e, logpath='r' * 300), 'for one name'),
    ('train-logpath-too-long', 'train', lambda e: train_argv(e, logpath='/'.join(['p' * 200] * 25)), 'too close to'),
    ('train-logpath-under-a-file', 'train', lambda e: train_argv(e, logpath='good.pt/run'), 'lies under the file'),
    ('test-logpath-holds-the-checkpoint', 'test', lambda e: eval_argv(e)[:-1] + [str(e['root'])],
     'contains the input --load'),
]


@pytest.mark.parametrize('case', OUTPUT_REFUSALS, ids=[c[0] for c in OUTPUT_REFUSALS])
def test_run_folders_are_refused_up_front(case, env, capsys):
    _, cli, argv, expected = case
    data_before, ckpt_before = folder_digest(Path(env['data'])), digest(env['good'])
    code, out = run(train_cli.main if cli == 'train' else test_cli.main, argv(env), capsys)
    assert code == 2 and 'Traceback' not in out and expected in out, out
    assert folder_digest(Path(env['data'])) == data_before and digest(env['good']) == ckpt_before


@pytest.mark.slow
def test_cdtg_trains_at_the_smallest_accepted_image_size(env, capsys):
    code, out = run(train_cli.main, train_argv(env, '--img-size', '32', *CDTG, '--cdtg-width', '64',
                                               logpath='cdtg-32'), capsys)
    assert code == 0 and 'NaN' not in out and 'degrees of freedom' not in out, out


def test_flag_errors_under_torchrun_print_once(env, capsys, monkeypatch):
    monkeypatch.setenv('RANK', '1')                     # every rank parses the same flags: rank 0 alone speaks
    code, out = run(train_cli.main, train_argv(env, '--bsz', '0'), capsys)
    assert code == 2 and out == ''
    monkeypatch.setenv('RANK', '0')
    code, out = run(train_cli.main, train_argv(env, '--bsz', '0'), capsys)
    assert code == 2 and out.count('--bsz must be an integer >= 1') == 1 and 'Traceback' not in out


def test_warnings_are_one_line_in_the_project_format(user, tiny_checkpoint, tmp_path, capsys):
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(tmp_path / 'full_mask.png')
    code, out = run(_predict(), predict_argv(user, tiny_checkpoint, out=tmp_path / 'p',
                                             supports=[f'{user}/s1.jpg:{tmp_path}/full_mask.png']), capsys)
    assert code == 0 and 'warning: support' in out
    assert 'warnings.warn(' not in out and 'UserWarning' not in out and '\nwarning: \n' not in out


def test_check_data_reports_exif_rotated_images(tmp_path, capsys):
    from fixtures_targets import write_isic
    write_isic(tmp_path)
    image = sorted(tmp_path.rglob('*.jpg'))[0]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(image).convert('RGB').save(image, exif=exif)
    code, out = run(lambda argv: __import__('scripts.check_data', fromlist=['main']).main(argv),
                    ['--benchmark', 'isic', '--datapath', str(tmp_path)], capsys)
    assert 'EXIF orientation 6' in out and image.name in out and 'Traceback' not in out

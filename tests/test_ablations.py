r"""scripts/ablations/*.sh: the commands their --dry-run prints (torchrun for GPUS=2, every registered method, the
right flags per ablation), argument errors, and the synthetic alpha sweep end to end (tiny) followed by report.py."""
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from model import METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / 'scripts' / 'ablations'
ALPHA_HOSTS = [m for m in METHODS if METHODS[m].plugin_point == 'prototypes']      # alpha = an image weight


def bash(script: str, *flags: str, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHON=sys.executable, **{k: str(v) for k, v in env.items()})
    for key in ('METHODS', 'TARGETS', 'SHOTS', 'SEEDS', 'ALPHAS', 'OUT', 'TRAIN_ARGS', 'TEST_ARGS', 'COMPONENTS',
                'ENCODERS', 'ENCODER_WEIGHTS'):
        if key not in env:
            environ.pop(key, None)
    return subprocess.run(['bash', str(SCRIPTS / script), *flags], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=timeout)


def commands(out: str, script: str) -> list[list[str]]:
    r"""The train.py / test.py command lines printed by a dry run (comments left out)."""
    return [shlex.split(line) for line in out.splitlines() if not line.startswith('#') and f'/{script} ' in line]


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_the_method_list_is_the_registry():
    out = subprocess.run([sys.executable, str(SCRIPTS / 'methods.py')], capture_output=True, text=True, check=True)
    assert out.stdout.split() == list(METHODS)
    out = subprocess.run([sys.executable, str(SCRIPTS / 'methods.py'), '--alpha-hosts'], capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ALPHA_HOSTS


@pytest.mark.slow
def test_main_table_dry_run_uses_torchrun_for_two_gpus(tmp_path):
    proc = bash('main_table.sh', '--dry-run', DATA='/data', GPUS=2, OUT=tmp_path)
    assert proc.returncode == 0, proc.stderr
    trains, tests = commands(proc.stdout, 'train.py'), commands(proc.stdout, 'test.py')
    torchrun = (['torchrun'], [sys.executable, '-m', 'torch.distributed.run'])       # whichever this machine has
    assert all(any(c[:len(t) + 3] == t + ["--standalone", "--nproc_per_node", "2"] for t in torchrun)
               for c in trains + tests)
    assert sorted((flag(c, '--method'), '--cdtg' in c) for c in trains) == \
        sorted((m, on) for m in METHODS for on in (False, True))
    assert all(flag(c, '--benchmark') == 'pascal' and flag(c, '--datapath') == '/data' and flag(c, '--fold') == 'all'
               and flag(c, '--backbone-weights') == 'imagenet' and flag(c, '--seed') == '0' for c in trains)
    cells = {(Path(flag(c, '--load')).parent.name, flag(c, '--benchmark'), flag(c, '--protocol'), flag(c, '--nshot'))
             for c in tests}
    expected = {(f'{m}{s}', t, p, k) for m in METHODS for s in ('', '-cdtg') for k in ('1', '5')
                for t, p in (('isic', None), ('lung', None), ('wbc', None), ('chaos', None), ('chaos', 'volumetric'))}
    assert cells == expected and len(tests) == len(expected)
    assert all(flag(c, '--episodes') == ('600' if flag(c, '--protocol') is None else None) for c in tests)


def test_one_process_and_cpu(tmp_path):
    proc = bash('shots.sh', '--dry-run', GPUS=1, OUT=tmp_path, METHODS='hsnet')
    trains, tests = commands(proc.stdout, 'train.py'), commands(proc.stdout, 'test.py')
    assert proc.returncode == 0 and trains and all(c[0] == sys.executable for c in trains + tests)
    assert sorted({flag(c, '--nshot') for c in tests}, key=int) == ['1', '3', '5', '10']
    proc = bash('shots.sh', '--dry-run', GPUS=0, OUT=tmp_path, METHODS='hsnet')
    trains, tests = commands(proc.stdout, 'train.py'), commands(proc.stdout, 'test.py')
    assert all(flag(c, '--device') == 'cpu' for c in trains + tests)


@pytest.mark.slow
def test_alpha_sweep_dry_run(tmp_path):
    proc = bash('alpha_sweep.sh', '--dry-run', '--retrain', OUT=tmp_path, SEEDS='0 1')
    assert proc.returncode == 0, proc.stderr
    trains, tests = commands(proc.stdout, 'train.py'), commands(proc.stdout, 'test.py')
    alphas = ['0', '0.1', '0.2', '0.3', '0.4', '0.5', '0.6', '0.7', '0.8', '0.9', '1']
    swept = [c for c in tests if '--alpha' in c]
    assert all('-cdtg' in flag(c, '--load') for c in swept)                   # only CD-TG models are swept
    assert sorted({float(flag(c, '--alpha')) for c in swept}) == [float(a) for a in alphas]
    assert {Path(flag(c, '--load')).parent.name for c in swept} == {f'{m}-cdtg' for m in ALPHA_HOSTS}
    assert len(swept) == len(ALPHA_HOSTS) * 2 * len(alphas) * 5      # x 2 seeds, x 5 targets (CHAOS 2D + 3D), 1 shot
    retrained = [c for c in trains if flag(c, '--alpha') is not None]
    assert sorted({(flag(c, '--seed'), flag(c, '--alpha')) for c in retrained}) == \
        sorted((s, a) for s in ('0', '1') for a in alphas)
    assert all('--cdtg' in c and flag(c, '--fusion') == 'fixed' and f'/retrained/alpha{flag(c, "--alpha")}/'
               in flag(c, '--logpath') for c in retrained)
    assert sorted({flag(c, '--method') for c in retrained}) == sorted(ALPHA_HOSTS)
    assert len(retrained) == len(ALPHA_HOSTS) * 2 * len(alphas)


@pytest.mark.slow
def test_components_dry_run(tmp_path):
    proc = bash('components.sh', '--dry-run', OUT=tmp_path)
    assert proc.returncode == 0, proc.stderr
    trains = commands(proc.stdout, 'train.py')
    by_folder = {}
    for c in trains:
        logpath = Path(flag(c, '--logpath'))
        by_folder.setdefault(logpath.parent.name, []).append(c)
    assert set(by_folder) == {'full', 'attn-attributes', 'fusion-learned', 'no-style-aug', 'lora', 'clip-RN50',
                              'clip-ViT-B-16'}
    assert sorted('--cdtg' in c for c in by_folder['full']) == [False] * len(METHODS) + [True] * len(METHODS)
    expect = {'attn-attributes': ('--cdtg-attn', 'attributes'), 'fusion-learned': ('--fusion', 'learned'),
              'lora': ('--text-lora', '8'), 'clip-RN50': ('--clip', 'RN50'), 'clip-ViT-B-16': ('--clip', 'ViT-B-16')}
    for folder, (name, val) in expect.items():
        assert len(by_folder[folder]) == len(METHODS)
        assert all('--cdtg' in c and flag(c, name) == val for c in by_folder[folder]), folder
    assert all('--no-style-aug' in c for c in by_folder['no-style-aug'])


@pytest.mark.slow
def test_text_encoders_dry_run(tmp_path):
    r"""One baseline and one CD-TG model per encoder for every method, tested on the paper's targets and the medical
    few-shot benchmarks (volumetric where a benchmark has it); local weights go to their own encoder only."""
    proc = bash('text_encoders.sh', '--dry-run', OUT=tmp_path, ENCODER_WEIGHTS='biomedclip=/w/BiomedCLIP')
    assert proc.returncode == 0, proc.stderr
    trains, tests = commands(proc.stdout, 'train.py'), commands(proc.stdout, 'test.py')
    by_folder = {}
    for c in trains:
        by_folder.setdefault(Path(flag(c, '--logpath')).parent.name, []).append(c)
    encoders = ['RN50', 'ViT-B-32', 'ViT-B-16', 'biomedclip', 'pubmedclip']
    assert sorted(by_folder) == sorted(['baseline'] + encoders)
    assert len(by_folder['baseline']) == len(METHODS) and not any('--cdtg' in c for c in by_folder['baseline'])
    for encoder in encoders:
        assert sorted(flag(c, '--method') for c in by_folder[encoder]) == sorted(METHODS)
        assert all('--cdtg' in c and flag(c, '--clip') == encoder for c in by_folder[encoder])
        assert all(flag(c, '--clip-weights') == ('/w/BiomedCLIP' if encoder == 'biomedclip' else None)
                   for c in by_folder[encoder])
    targets = {(flag(c, '--benchmark'), flag(c, '--protocol')) for c in tests}
    assert targets == {('isic', None), ('lung', None), ('wbc', None), ('chaos', None), ('chaos', 'volumetric'),
                       ('abd-ct', None), ('abd-ct', 'volumetric'), ('cmr', None), ('cmr', 'volumetric'),
                       ('kvasir', None)}
    assert len(tests) == len(targets) * len(METHODS) * (1 + len(encoders))
    for env in ({'ENCODERS': 'RN50 gpt'}, {'ENCODER_WEIGHTS': 'clip=/w'}):
        proc = bash('text_encoders.sh', '--dry-run', OUT=tmp_path, **env)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr and ('gpt' in proc.stderr or 'clip=/w' in
                                                                            proc.stderr)


def test_synthetic_dry_run_and_argument_errors(tmp_path):
    proc = bash('main_table.sh', '--dry-run', '--synthetic', OUT=tmp_path)
    trains, tests = commands(proc.stdout, 'train.py'), commands(proc.stdout, 'test.py')
    assert proc.returncode == 0 and trains and tests
    assert all(flag(c, '--benchmark') == 'synthetic' and flag(c, '--backbone-weights') == 'none'
               and flag(c, '--clip-weights') == 'none' and int(flag(c, '--bn-calibration')) > 0 for c in trains)
    assert {flag(c, '--benchmark') for c in tests} == {'synthetic-med'}
    for argv, env, expected in ((['--bogus'], {}, "unknown argument '--bogus'"),
                                (['--retrain'], {}, 'has no --retrain'),
                                (['--dry-run'], {'GPUS': 'two'}, 'GPUS must be')):
        proc = bash('main_table.sh', *argv, OUT=tmp_path, **env)
        assert proc.returncode == 2 and expected in proc.stderr and 'Traceback' not in proc.stderr
    help_text = bash('main_table.sh', '--help').stdout
    assert 'DATA=/data GPUS=1 bash scripts/ablations/main_table.sh' in help_text


@pytest.mark.slow
def test_synthetic_alpha_sweep_end_to_end_then_report(datapath, tmp_path):
    r"""The CPU variant, tiny: 1 method (a prototype host, whose alpha can be swept), 1 training step per model, 4
    test episodes, one alpha override; resumable; report.py then writes the table, the alpha plot and the qualitative
    figure from its folder."""
    tiny = dict(DATA=datapath, OUT=tmp_path / 'sweep', GPUS=0, METHODS='patnet', ALPHAS='0', EPISODES=4,
                TRAIN_EPISODES=2, VAL_EPISODES=2, BSZ=2, BN_CALIBRATION=4, TRAIN_ARGS='--tb-images 0')
    proc = bash('alpha_sweep.sh', '--synthetic', timeout=900, **tiny)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    grid = (tmp_path / 'sweep' / 'seed0' / 'grid.csv').read_text().splitlines()
    assert grid[0] == 'method,cdtg,alpha,target,protocol,shots,miou,fbiou,dice'
    assert [tuple(line.split(',')[1:3]) for line in grid[1:]] == [('off', ''), ('on', '0.7'), ('on', '0.0')]
    again = bash('alpha_sweep.sh', '--synthetic', timeout=300, **tiny)                 # resumes: nothing re-runs
    assert again.returncode == 0 and again.stdout.count('reusing') == 3 and 'training' not in again.stdout

    import scripts.report as report
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        result = report.main([str(tmp_path / 'sweep'), '--datapath', str(datapath), '--device', 'cpu'])
    out = tmp_path / 'sweep' / 'report'
    assert result['alpha_plot'] and result['figure']
    for name in ('table.md', 'table.tex', 'table.csv', 'alpha_sweep.png', 'alpha_sweep.pdf', 'qualitative.png'):
        assert (out / name).stat().st_size > 0, name
    rows = (out / 'table.md').read_text().splitlines()
    assert rows[2].startswith('| patnet |') and rows[3].startswith('| patnet +CD-TG |')
    assert re.search(r'\| [+-]\d+\.\d \|$', rows[3])                           # the delta column


@pytest.mark.parametrize('script', ['main_table.sh', 'alpha_sweep.sh', 'components.sh', 'shots.sh',
                                    'text_encoders.sh'])
def test_scripts_are_strict_bash(script):
    text = (SCRIPTS / script).read_text()
    assert text.startswith('#!/usr/bin/env bash') and 'common.sh' in text
    assert 'set -euo pipefail' in (SCRIPTS / 'common.sh').read_text()
    assert subprocess.run(['bash', '-n', str(SCRIPTS / script)]).returncode == 0

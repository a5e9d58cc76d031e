r"""scripts/ablations/sanity.sh (CD-TG's no-harm check): the arms its dry run trains, paired by seed, and the
report's statistics by hand."""
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(folder: Path, miou: float, fg: list[float], cos: float | None = None) -> None:
    cell = folder / 'test-synthetic-med-1shot'
    cell.mkdir(parents=True)
    (cell / 'results.json').write_text(json.dumps({'miou': miou, 'fbiou': 50.0, 'dice': 40.0}))
    lines = [{'step': 10 * i, 'fg_fraction': v, 'gt_fg_fraction': 0.1, **({'text_proto_cos': cos, 'u_over_f':
             [0.3, 0.31]} if cos is not None else {})} for i, v in enumerate(fg)]
    (folder / 'health.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))


def test_sanity_report_by_hand(tmp_path):
    host, cdtg, alpha1 = [30.0, 34.0, 32.0], [31.0, 30.0, 35.0], [30.0, 34.0, 32.5]
    for seed in range(3):
        _fake_run(tmp_path / f'seed{seed}' / 'host' / 'patnet', host[seed], [0.0] * 8 + [0.1, 0.12] * 4)
        _fake_run(tmp_path / f'seed{seed}' / 'cdtg' / 'patnet-cdtg', cdtg[seed], [0.1] * 8, cos=0.9 + seed / 100)
        _fake_run(tmp_path / f'seed{seed}' / 'alpha1' / 'patnet-cdtg', alpha1[seed], [0.1] * 8, cos=0.5)
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'ablations' / 'sanity.py'), str(tmp_path),
                           '--methods', 'patnet', '--arms', 'host', 'cdtg', 'alpha1', '--out', str(tmp_path / 'rep')],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((tmp_path / 'rep' / 'sanity.json').read_text())[0]
    rows = {r['arm']: r for r in entry['rows']}
    assert math.isclose(entry['host_spread'], 2.0) and math.isclose(rows['host']['mean'], 32.0)
    assert math.isclose(rows['cdtg']['delta'], 0.0) and rows['cdtg']['within_spread'] is True
    assert math.isclose(rows['cdtg']['delta_std'], ((1 + 16 + 9) / 2) ** 0.5)
    assert rows['cdtg']['text_proto_cos'] == 0.92 and rows['cdtg']['u_over_f'] == 0.31
    assert rows['alpha1']['equals_host'] is False and '**differs from host**' in proc.stdout
    fg = entry['host_fg']['0']
    assert math.isclose(fg['last_quarter'], 0.11) and fg['levelled'] is True
    assert (tmp_path / 'rep' / 'sanity.md').read_text().startswith('# CD-TG no-harm check')


@pytest.mark.slow
def test_sanity_dry_run_trains_every_arm_paired_by_seed(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), METHODS='patnet')
    env.pop('SEEDS', None)
    proc = subprocess.run(['bash', str(ROOT / 'scripts' / 'ablations' / 'sanity.sh'), '--dry-run', '--synthetic'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    trains = [shlex.split(line) for line in proc.stdout.splitlines() if '/train.py ' in line
              and not line.startswith('#')]
    arms = {}
    for cmd in trains:
        seed, arm = Path(cmd[cmd.index('--logpath') + 1]).parts[-3:-1]
        arms.setdefault(arm, set()).add(seed)
        last_episodes = len(cmd) - 1 - cmd[::-1].index('--episodes-per-epoch')
        assert cmd[last_episodes + 1] == str(240 * 8) and '--log-every' in cmd
    assert arms == {arm: {'seed0', 'seed1', 'seed2'} for arm in
                    ('host', 'cdtg', 'alpha1', 'random-text', 'shuffled-text', 'no-style-aug')}
    by_arm = {Path(c[c.index('--logpath') + 1]).parts[-2]: c for c in trains}
    assert '--cdtg' not in by_arm['host'] and '--cdtg' in by_arm['cdtg']
    assert by_arm['alpha1'][by_arm['alpha1'].index('--alpha') + 1] == '1' and '--no-style-aug' in by_arm['alpha1']
    assert by_arm['shuffled-text'][by_arm['shuffled-text'].index('--cdtg-text') + 1] == 'shuffled'
    assert by_arm['random-text'][by_arm['random-text'].index('--cdtg-text') + 1] == 'random'

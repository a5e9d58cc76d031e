r"""scripts/bench.py --quick: every registered method, with and without CD-TG, 1- and 2-shot, through the same
test-time entry point as test.py; the table's rows and the JSON it writes."""
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from model import METHODS

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location('bench', ROOT / 'scripts' / 'bench.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_quick_runs_every_method(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    result = load_bench().main(['--quick', '--shots', '1', '2', '--threads', '2', '--json', str(out)])
    saved = json.loads(out.read_text())
    assert saved['rows'] == json.loads(json.dumps(result['rows']))
    rows = {(r['method'], r['cdtg'], r['shots']): r for r in saved['rows']}
    assert set(rows) == {(m, c, k) for m in METHODS for c in ('off', 'on') for k in (1, 2)}
    for (method, cdtg, shots), row in rows.items():
        assert len(row['test_times']) == 1 and row['test_s'] == statistics.median(row['test_times']) > 0
        assert math.isfinite(row['test_peak_mb'])
        assert (row['train_s'] is not None) == (shots == 1)            # one training measurement per model
        if row['train_s'] is not None:
            assert row['train_s'] > 0
        if cdtg == 'on':                                               # the plug-in's share of the same episode
            assert len(row['hooks_times']) == 1 and 0 < row['hooks_s'] < row['test_s']
    printed = capsys.readouterr().out
    for method in METHODS:                                             # one table line per row
        assert sum(line.split()[:1] == [method] for line in printed.splitlines()) == 4
    assert saved['img_size'] == 64


def test_bench_times_configurations_alternately():
    calls = []
    times = load_bench().interleaved({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
                                     torch.device('cpu'), reps=4, warmup=1)
    assert calls == ['a', 'b'] + ['a', 'b', 'b', 'a'] * 2               # warm-up, then ABBAABBA
    assert [len(t) for t in times.values()] == [4, 4]


@pytest.mark.slow
def test_hook_clock_times_only_the_hooks_and_comes_off():
    import time

    from model.base import Hooks

    class Slow(Hooks):
        def prototypes(self, fg, bg, feats, ctx):
            time.sleep(0.05)
            return fg, bg

    hooks = Slow()
    clock = load_bench().HookClock(hooks, torch.device('cpu'))

    def episode():
        time.sleep(0.3)                                                   # the host's own work is not counted
        hooks.query_features([], None)
        return hooks.prototypes([1], [2], [], None)

    run = clock.runner(episode)
    assert run() == ([1], [2]) and run() == ([1], [2])
    assert len(clock.episodes) == 2 and all(0.05 <= t < 0.3 for t in clock.episodes)
    clock.remove()
    assert 'prototypes' not in vars(hooks) and hooks.prototypes.__func__ is Slow.prototypes


def test_peak_memory_catches_a_freed_allocation():
    bench = load_bench()
    with bench.PeakMemory(torch.device('cpu')) as mem:
        block = torch.ones(64, 2**20)                                     # 256 MB, touched, then freed
        del block
    assert mem.mb > 200 and mem.total_mb > mem.mb


@pytest.mark.slow
def test_bench_measures_peak_memory_in_a_fresh_process():
    result = load_bench().main(['--quick', '--methods', 'hsnet', '--cdtg', 'off', '--shots', '2', '--memory',
                                'isolated', '--threads', '1'])
    row = result['rows'][0]
    assert row['memory'] == 'isolated'
    assert row['test_peak_total_mb'] > 100                               # the process (torch alone holds more)
    assert 0 <= row['test_peak_mb'] < row['test_peak_total_mb']


def test_reference_code_must_be_a_hsnet_checkout(tmp_path):
    with pytest.raises(UserError, match='git clone https://github.com/juhongm999/hsnet'):
        load_bench().main(['--quick', '--methods', 'hsnet', '--cdtg', 'off', '--shots', '2',
                           '--reference-code', str(tmp_path)])


@pytest.mark.slow
def test_compare_reference_times_the_reference_kshot_with_a_dense_correlation(monkeypatch, capsys):
    import model.layers.correlation as correlation
    bench = load_bench()
    sparse_calls = []
    sparse = correlation._cpu_correlation
    monkeypatch.setattr(correlation, '_cpu_correlation', lambda *a, **k: sparse_calls.append(1) or sparse(*a, **k))
    device = torch.device('cpu')
    ep = bench.episode(64, 3, 1, 0, device)
    model = bench.build('hsnet', False, device)
    ours = model.segment(bench.episode_runner(model, ep, 'fp32', device)())
    assert len(sparse_calls) == 3 * 3                                    # 3 shots x 3 wide stages on the CPU path
    sparse_calls.clear()
    reference = bench.reference_kshot(model, ep, 'fp32', device)()
    assert not sparse_calls and model.dense_correlation is False        # every support pixel; the switch restored
    assert (reference == ours).float().mean() > 0.999                   # the same vote, up to float rounding
    assert (bench.reference_kshot(model, ep, 'fp32', device, dense=False)() == ours).float().mean() > 0.999
    assert len(sparse_calls) == 9
    sparse_calls.clear()
    row = bench.main(['--quick', '--methods', 'hsnet', '--cdtg', 'off', '--shots', '3', '--compare-reference',
                      '--threads', '1', '--profile', '4'])['rows'][0]
    assert all(row[k] > 0 for k in ('reference_kshot_s', 'reference_layers_kshot_s', 'batched_shots_s',
                                    'train_pair_s', 'train_dense_s'))
    out = capsys.readouterr().out
    assert 'vs reference K-shot' in out and 'train step vs dense correlation' in out
    # the profile: 4 operators, one episode's worth of time, the backbone a part of it (at 64x64 ATen keeps the small
    # maps' convolutions on its reference kernel: tests/test_backbone.py checks the 1x1 routing itself)
    assert len(row['profile_top']) == 4 and 0 < row['backbone_share'] < 1
    assert row['profile_ms'] >= sum(ms for _, _, ms in row['profile_top'])
    assert 'aten::slow_conv_dilated2d' not in [name for name, _, _ in row['profile_top']]
    assert 'profile of one hsnet episode' in out and 'aten::mkldnn_convolution' in out


def test_loader_alone_with_the_shared_image_cache(datapath, capsys):
    r"""`--loader B` times data loading alone (no model rows); with --cache-images each distinct pair of the episode
    list is decoded once into the shared cache, and the report says so."""
    argv = ['--loader', 'synthetic-med', '--datapath', str(datapath), '--workers', '0', '--loader-episodes', '8',
            '--shots', '1', '--img-size', '32']
    cached = load_bench().main(argv + ['--cache-images', '100'])
    assert cached['rows'] == [] and cached['loader']['episodes'] == 8
    assert cached['loader']['cache_decodes'] == cached['loader']['distinct_pairs'] <= 16
    plain = load_bench().main(argv)['loader']
    assert plain['cache_decodes'] is None and plain['distinct_pairs'] == cached['loader']['distinct_pairs']
    out = capsys.readouterr().out
    assert 'shared image cache of 100 pairs' in out and 'no image cache' in out and 'method  cdtg' not in out

r"""scripts/bench.py --quick: every registered method, with and without CD-TG, 1- and 2-shot, through the same
test-time entry point as test.py; the table's rows and the JSON it writes."""
import importlib.util
import json
import math
import statistics
from pathlib import Path

from model import METHODS

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location('bench', ROOT / 'scripts' / 'bench.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    printed = capsys.readouterr().out
    for method in METHODS:                                             # one table line per row
        assert sum(line.split()[:1] == [method] for line in printed.splitlines()) == 4
    assert saved['img_size'] == 64

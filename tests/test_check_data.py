r"""scripts/check_data.py and scripts/prepare_chaos.py reports, exit codes, and no traceback for a broken dataset."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fixtures_targets as ft
from common.errors import UserError
from common.errors import run_cli as run_entry
from test_targets import corrupt_png_data, truncate

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f'script_{name}', REPO / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_data = load_script('check_data')
prepare_chaos = load_script('prepare_chaos')


def run_check(capsys, *args):
    rc = check_data.main(list(args))
    return rc, capsys.readouterr().out


def run_process(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_lung_report_lists_images_without_masks(tmp_path, capsys):
    facts = ft.write_lung(tmp_path)
    rc, out = run_check(capsys, '--benchmark', 'lung', '--datapath', str(tmp_path))
    assert rc == 0
    assert 'lung: 6' in out and 'images without masks: 2 (warning)' in out and 'masks without images: 0' in out
    for name in facts['unmasked']:
        assert f'CXR_png/{name}.png' in out
    assert out.strip().endswith('OK: 6 usable items in 1 classes')


def test_isic_report_hard_problems_and_unexpected_values(tmp_path, capsys):
    facts = ft.write_isic(tmp_path)
    ids = sorted(facts)
    base = tmp_path / 'ISIC2018'
    gt = base / 'ISIC2018_Task1_Training_GroundTruth'
    (base / 'ISIC2018_Task1-2_Training_Input' / f'{ids[0]}.jpg').unlink()
    truncate(gt / f'{ids[1]}_segmentation.png')
    corrupt_png_data(gt / f'{ids[2]}_segmentation.png')
    soft = np.asarray(Image.open(gt / f'{ids[3]}_segmentation.png')).copy()
    soft[0, 0] = 128
    Image.fromarray(soft).save(gt / f'{ids[3]}_segmentation.png')
    report_json = tmp_path / 'report.json'
    rc, out = run_check(capsys, '--benchmark', 'isic', '--datapath', str(tmp_path), '--json', str(report_json))
    assert rc == 1
    assert 'masks without images: 1 (1 ERROR)' in out and f'{ids[0]}_segmentation.png' in out
    assert 'unreadable or corrupt files: 2 (2 ERRORS)' in out
    assert f'{ids[1]}_segmentation.png: truncated PNG' in out and f'{ids[2]}_segmentation.png: unreadable' in out
    assert 'unexpected mask values: 1 (warning)' in out and '128 (1 px)' in out
    assert 'FAILED: 3 hard problems' in out
    counts = {'melanoma': 4, 'nevus': 6, 'seborrheic keratosis': 3}
    for i in range(3):
        counts[facts[ids[i]]] -= 1
    for name, n in counts.items():
        assert f'  {name}: {n}' in out
    saved = json.loads(report_json.read_text())
    assert saved['counts'] == counts and sum(p['hard'] for p in saved['problems']) == 3
    # --quick is what a loader does on construction: the damage inside the PNG data goes unseen there
    rc, out = run_check(capsys, '--benchmark', 'isic', '--datapath', str(tmp_path), '--quick')
    assert rc == 1 and 'unreadable or corrupt files: 1 (1 ERROR)' in out and 'headers only' in out


def test_wbc_report_shows_stray_values_snapped(tmp_path, capsys):
    ft.write_wbc(tmp_path)
    rc, out = run_check(capsys, '--benchmark', 'wbc', '--datapath', str(tmp_path), '--wbc-subset', '2')
    assert rc == 0 and 'nucleus: 3' in out and 'cytoplasm: 3' in out
    assert 'Dataset 2/002.png: values outside {0, 128, 255}: 2 (1 px), 45 (1 px), 70 (1 px)' in out
    assert 'snapped to the nearest' in out


def test_chaos_report_before_and_after_preparation(tmp_path, capsys):
    ft.write_chaos(tmp_path, pids=(1, 2), n_slices=3, size=8)
    rc, out = run_check(capsys, '--benchmark', 'chaos', '--datapath', str(tmp_path))
    assert rc == 1 and 'prepared cache does not exist yet' in out
    assert f'python scripts/prepare_chaos.py --datapath {tmp_path}' in out
    manifest = prepare_chaos.main(['--datapath', str(tmp_path)])
    printed = capsys.readouterr().out
    assert 'prepared 2 volumes (6 slices)' in printed and 'liver: 4 slices in 2 volumes' in printed
    assert len(manifest['volumes']) == 2
    rc, out = run_check(capsys, '--benchmark', 'chaos', '--datapath', str(tmp_path))
    assert rc == 0 and 'liver: 4' in out and 'raw DICOM layout' in out
    label = tmp_path / 'CHAOS' / 'Train_Sets' / 'MR' / '2' / 'T2SPIR' / 'Ground' / 'IMG-0002-00001.png'
    arr = np.asarray(Image.open(label)).copy()
    arr[0, 0] = 90
    Image.fromarray(arr).save(label)
    rc, out = run_check(capsys, '--benchmark', 'chaos', '--datapath', str(tmp_path))
    assert rc == 1 and 'unexpected mask values: 1 (1 ERROR)' in out and '90 (1 px)' in out


def test_checker_flag_errors():
    with pytest.raises(UserError, match="'pascal' is not one of them"):
        check_data.main(['--benchmark', 'pascal', '--datapath', 'x'])
    with pytest.raises(UserError, match='--wbc-subset does not apply'):
        check_data.main(['--benchmark', 'isic', '--datapath', 'x', '--wbc-subset', '1'])
    with pytest.raises(UserError, match='--limit must be an integer >= 1, got 0'):
        check_data.main(['--benchmark', 'isic', '--datapath', 'x', '--limit', '0'])
    with pytest.raises(UserError, match="no 'trn' split"):
        check_data.main(['--benchmark', 'isic', '--datapath', 'x', '--split', 'trn'])


def cli_error(capsys, main, argv) -> str:
    r"""Run an entry point the way its __main__ does (through common.errors.run_cli); return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_entry(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return err


def test_missing_layouts_give_a_message_not_a_traceback(tmp_path, capsys):
    err = cli_error(capsys, check_data.main, ['--benchmark', 'wbc', '--datapath', str(tmp_path)])
    assert err.startswith('error: wbc: folder') and 'Expected layout' in err
    err = cli_error(capsys, prepare_chaos.main, ['--datapath', str(tmp_path)])
    assert err.startswith('error: chaos: no raw CHAOS MR folder')


@pytest.mark.slow
def test_test_py_missing_or_corrupt_dataset_in_a_worker(tmp_path, untrained_checkpoint, capsys):
    import test as test_cli
    args = ['--load', str(untrained_checkpoint), '--benchmark', 'lung', '--datapath', str(tmp_path), '--episodes', '2',
            '--device', 'cpu', '--img-size', '32', '--logpath', str(tmp_path.with_name(tmp_path.name + '-run'))]
    err = cli_error(capsys, test_cli.main, args)
    assert err.startswith('error: lung: folder') and 'Expected layout' in err
    ft.write_lung(tmp_path)
    for mask in (tmp_path / 'Lung Segmentation' / 'masks').glob('*.png'):
        corrupt_png_data(mask)                  # header and tail intact: found only when a worker decodes it
    # a real process: the UserError is raised inside a DataLoader worker and must still reach the user cleanly
    rc, out, err = run_process('test.py', *args, '--workers', '1')
    assert rc == 2 and 'Traceback' not in err
    message = err[err.index('error: '):]
    assert message.startswith('error: mask file ') and 'masks/' in message and 'unreadable or corrupt' in message

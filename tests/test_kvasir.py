r"""Kvasir-SEG (`kvasir`) read from a fixture in the exact kvasir-seg.zip layout: JPEG images and JPEG masks whose
decoded values carry compression noise, in several sizes. The mask rule is checked against hand computations and
against the drawn truth, and every bad layout against a message that names the file or folder."""
import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures_targets as ft
from common.errors import UserError
from data import DATASETS
from data.episodic import mask_tensor
from data.kvasir import GRAY_BAND, MAX_GRAY_FRACTION, binarise, gray_fraction, mask_problem
from test_check_data import check_data, run_check
from test_targets import METRIC_LINE, build, truncate


@pytest.fixture(scope='module')
def kvasir(tmp_path_factory):
    root = tmp_path_factory.mktemp('kvasir')
    return root, ft.write_kvasir(root)


@pytest.fixture
def fresh(tmp_path):
    r"""A writable copy per test that damages it: (datapath, truth, images folder, masks folder)."""
    truth = ft.write_kvasir(tmp_path)
    return tmp_path, truth, tmp_path / 'Kvasir-SEG' / 'images', tmp_path / 'Kvasir-SEG' / 'masks'


def photo(h: int, w: int) -> np.ndarray:
    r"""An endoscopy-like photo: pinkish-red mucosa shading, the kind of file a wrong copy puts among the masks."""
    yy, xx = np.mgrid[0:h, 0:w]
    red = 150 + 60 * np.sin(yy / 5.0) * np.cos(xx / 7.0)
    return np.stack([red, red * 0.55, red * 0.45], axis=2).astype(np.uint8)


# --- the mask rule --------------------------------------------------------------------------------------------------
def test_binarise_is_luminance_at_least_128_by_hand():
    raw = np.array([[0, 1, 10, 127], [128, 129, 245, 255]], np.uint8)
    assert binarise(raw).tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    # a JPEG background whose noise peaks at 1 is empty, not a 0/1-coded mask (binary_mask would say otherwise)
    noise = np.array([[0, 1, 0], [1, 1, 0]], np.uint8)
    assert binarise(noise).sum() == 0
    # RGB masks are read through PIL's luminance L = (299 R + 587 G + 114 B) / 1000: gray (130, 130, 130) -> 130
    # (foreground), pure red (255, 0, 0) -> 76 (background)
    rgb = Image.fromarray(np.array([[[130, 130, 130], [255, 0, 0], [250, 250, 250]]], np.uint8))
    assert np.asarray(rgb.convert('L')).tolist() == [[130, 76, 250]]
    assert binarise(np.asarray(rgb.convert('L'))).tolist() == [[1, 0, 1]]


def test_near_binary_rule_by_hand():
    lo, hi = GRAY_BAND
    assert (lo, hi, MAX_GRAY_FRACTION) == (32, 223, 0.10)
    edge = np.array([lo - 1, lo, hi, hi + 1], np.uint8)
    assert gray_fraction(edge) == 0.5                        # 32 and 223 are mid-gray, 31 and 224 are not
    mask = np.zeros(100, np.uint8)
    mask[:10] = 100                                          # exactly 10 % mid-gray: still a mask
    assert mask_problem(mask) is None
    mask[10] = 200                                           # 11 %: refused
    problem = mask_problem(mask)
    assert problem.startswith('not a binary mask: 11.0% of its pixels are mid-gray (32-223)')
    assert 'kvasir-seg.zip' in problem
    assert mask_problem(np.asarray(Image.fromarray(photo(40, 50)).convert('L'))) is not None


# --- the loader -----------------------------------------------------------------------------------------------------
def test_pairs_by_name_binarise_to_the_drawn_polyp_and_keep_their_sizes(kvasir):
    root, truth = kvasir
    ds = build('kvasir', root)
    assert ds.domain == 'target' and ds.splits == ('test',) and ds.default_episodes == 600
    assert ds.class_names == ['polyp'] and ds.class_items == [sorted(truth)]
    sizes = set()
    for key, drawn in truth.items():
        path = ds._paths[key][1]
        raw = np.asarray(Image.open(path).convert('L'))
        assert set(np.unique(raw)) - {0, 255}, f'{path} should carry JPEG noise'
        mask = ds.read_mask(key, 0)
        assert mask.dtype == np.uint8 and (mask == drawn).all(), key          # the drawn truth, pixel for pixel
        image = np.asarray(ds.read_image(key).convert('L'))
        assert ((image > 128) == drawn).all(), key                            # paired with its own image
        sizes.add(mask.shape)
    assert sizes == {(h, w) for h, w in ft.KVASIR_SIZES}
    assert len({m.tobytes() for m in truth.values()}) == len(truth)          # a swapped pair would be noticed


def test_datapath_may_be_the_kvasir_folder_itself_or_lowercase(kvasir, tmp_path):
    root, truth = kvasir
    assert build('kvasir', root / 'Kvasir-SEG').class_items == [sorted(truth)]
    shutil.copytree(root / 'Kvasir-SEG', tmp_path / 'kvasir-seg')
    ds = build('kvasir', tmp_path)
    assert ds.class_items == [sorted(truth)] and ds.report.root == tmp_path / 'kvasir-seg'


def test_episodes_are_400px_and_never_use_the_query_as_support(kvasir):
    root, truth = kvasir
    ds = DATASETS['kvasir'](str(root), nshot=5)             # the benchmark's own defaults
    assert ds.img_size == 400
    episodes = ds.sample_episodes(ds.default_episodes, 0)
    assert episodes == ds.sample_episodes(600, 0) and episodes != ds.sample_episodes(600, 1)
    assert len(episodes) == 600 and {e.class_id for e in episodes} == {0}
    assert {e.query for e in episodes} == set(truth)        # 600 uniform draws over 6 images reach every image
    for e in episodes:
        assert e.query not in e.supports and len(set(e.supports)) == 5     # 5 other images exist: all distinct
    batch = ds[episodes[0]]
    assert batch['query_img'].shape == (3, 400, 400) and batch['support_masks'].shape == (5, 400, 400)
    expected = mask_tensor(truth[episodes[0].query].astype(np.uint8), 400)
    assert torch.equal(batch['query_mask'], expected)
    for k, key in enumerate(episodes[0].supports):
        assert torch.equal(batch['support_masks'][k], mask_tensor(truth[key].astype(np.uint8), 400))


def test_is_a_target_never_trained_or_selected_on():
    from engine.training import _check_source
    for role in ('training', 'model selection'):
        with pytest.raises(UserError, match="'kvasir' is a target-domain benchmark"):
            _check_source('kvasir', role)


# --- bad layouts and files ------------------------------------------------------------------------------------------
def _first(folder):
    return sorted(folder.glob('*.jpg'))[0]


BAD = {
    # case: (damage(datapath, images, masks) -> the path the message must name, message pattern)
    'nothing there': (lambda d, i, m: (shutil.rmtree(d / 'Kvasir-SEG'), d / 'Kvasir-SEG' / 'images')[1],
                      r'folder .* does not exist \(also looked for "kvasir-seg/images"[\s\S]*Expected layout'),
    'masks folder missing': (lambda d, i, m: (shutil.rmtree(m), m)[1], r'does not exist\.\nExpected layout'),
    'no images': (lambda d, i, m: ([p.unlink() for p in i.glob('*.jpg')], i)[1],
                  r'no image \(\*\.jpg\) in .* \(it is empty\); extract kvasir-seg\.zip'),
    'masks as png': (lambda d, i, m: ([Image.open(p).save(p.with_suffix('.png')) or p.unlink()
                                       for p in m.glob('*.jpg')], m)[1],
                     r'no mask \(\*\.jpg\) in .* \(it holds cju00kq0000l0dewei2\.png'),
    'image without mask': (lambda d, i, m: (_first(m).unlink(), _first(i))[1],
                           r'\[images without masks\] .*: its mask .*masks/cju00kq0000l0dewei2\.jpg is missing'),
    'mask without image': (lambda d, i, m: (_first(i).unlink(), _first(m))[1],
                           r'\[masks without images\] .*: its image .*images/cju00kq0000l0dewei2\.jpg is missing'),
    'truncated image': (lambda d, i, m: (truncate(_first(i), keep=0.9), _first(i))[1],     # a cut download
                        r'\[unreadable or corrupt files\] .*: truncated JPEG \(no end-of-image marker\)'),
    'text saved as mask': (lambda d, i, m: (_first(m).write_text('not a jpeg'), _first(m))[1],
                           r'\[unreadable or corrupt files\] .*: unreadable'),
    'mask of another size': (lambda d, i, m: (Image.open(_first(m)).resize((20, 16)).save(_first(m)), _first(m))[1],
                             r'\[image/mask size mismatches\] .*: mask is 20x16 but image cju00kq0000l0dewei2\.jpg '
                             r'is 52x36'),
    'a second mask spelling': (lambda d, i, m: (shutil.copy(_first(m), m / 'cju00kq0000l0dewei2.jpeg'), _first(m))[1],
                               r'\[other problems\] .*: a second mask named cju00kq0000l0dewei2 \(the other is '
                               r'cju00kq0000l0dewei2\.jpeg\); keep one of them'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_layouts_name_the_file_and_the_fix(fresh, case):
    datapath, truth, images, masks = fresh
    damage, pattern = BAD[case]
    named = damage(datapath, images, masks)
    with pytest.raises(UserError, match=pattern) as err:
        build('kvasir', datapath)
    text = str(err.value)
    assert str(named) in text and 'Traceback' not in text
    if case in ('nothing there', 'masks folder missing', 'no images', 'masks as png'):
        return
    assert 'extract these files again from kvasir-seg.zip' in text and '--skip-bad' in text
    with pytest.warns(UserWarning, match='--skip-bad left out 1 items'):
        ds = build('kvasir', datapath, skip_bad=True)
    assert ds.class_items == [sorted(truth)[1:]]          # every case damages the first pair


def test_too_few_pairs_is_an_error(tmp_path):
    ft.write_kvasir(tmp_path, n=1)
    with pytest.raises(UserError, match=r'kvasir/test under .* has no class with at least 2 images[\s\S]*Kvasir-SEG/'):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            build('kvasir', tmp_path)


def test_a_photo_saved_as_a_mask_is_refused_by_the_checker_and_on_reading(fresh, capsys):
    datapath, truth, images, masks = fresh
    bad = _first(masks)
    h, w = np.asarray(Image.open(bad)).shape[:2]
    Image.fromarray(photo(h, w)).save(bad, quality=75)
    ds = build('kvasir', datapath)                  # headers only on construction: the pixels are not read yet
    with pytest.raises(UserError, match=re.escape(f'kvasir: mask file {bad} is not a binary mask')) as err:
        ds.read_mask(bad.stem, 0)
    assert 'Replace it by the mask of the same name from kvasir-seg.zip' in str(err.value)
    rc, out = run_check(capsys, '--benchmark', 'kvasir', '--datapath', str(datapath))
    assert rc == 1
    assert 'unexpected mask values: 1 (1 ERROR)' in out and f'ERROR {bad}: not a binary mask' in out
    assert '  polyp: 5' in out and 'FAILED: 1 hard problems' in out


# --- scripts/check_data.py and test.py ------------------------------------------------------------------------------
def test_check_data_full_report(kvasir, tmp_path, capsys):
    root, truth = kvasir
    report_json = tmp_path / 'kvasir.json'
    rc, out = run_check(capsys, '--benchmark', 'kvasir', '--datapath', str(root), '--json', str(report_json))
    assert rc == 0, out
    assert f'kvasir: {root / "Kvasir-SEG"} (12 files checked, full decode)' in out
    assert '  polyp: 6' in out and 'images without masks: 0' in out and 'unexpected mask values: 0' in out
    assert ('note: 6 of 6 masks hold JPEG compression values besides 0 and 255 (expected for Kvasir-SEG); every '
            'mask is binarised at luminance >= 128') in out
    assert out.strip().endswith('OK: 6 usable items in 1 classes')
    saved = json.loads(report_json.read_text())
    assert saved['counts'] == {'polyp': 6} and saved['problems'] == [] and saved['files_checked'] == 12
    empty = tmp_path / 'data'
    ft.write_kvasir(empty)
    mask = _first(empty / 'Kvasir-SEG' / 'masks')
    Image.fromarray(np.full(np.asarray(Image.open(mask)).shape[:2], 3, np.uint8)).save(mask, quality=75)
    rc, out = run_check(capsys, '--benchmark', 'kvasir', '--datapath', str(empty), '--quick')
    assert rc == 0 and 'headers only' in out and 'masks without foreground' not in out
    rc, out = run_check(capsys, '--benchmark', 'kvasir', '--datapath', str(empty))
    assert rc == 0 and f'masks without foreground: 1 (warning)\n    {mask}: no pixel reaches luminance 128' in out
    with pytest.raises(UserError, match='--wbc-subset does not apply'):
        check_data.main(['--benchmark', 'kvasir', '--datapath', str(root), '--wbc-subset', '1'])


def test_test_py_runs_on_kvasir(kvasir, untrained_checkpoint, tmp_path, capsys):
    import test as test_cli
    root, truth = kvasir
    torch.set_num_threads(1)            # two shared cores: one thread is faster here (conftest restores it)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        results = test_cli.main(['--load', str(untrained_checkpoint), '--benchmark', 'kvasir', '--datapath', str(root),
                                 '--nshot', '1', '--episodes', '2', '--bsz', '2', '--workers', '0', '--img-size', '32',
                                 '--device', 'cpu', '--logpath', str(tmp_path / 'run')])
    out = capsys.readouterr().out
    assert METRIC_LINE.search(out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert saved['benchmark'] == 'kvasir' and saved['split'] == 'test' and saved['img_size'] == 32
    assert list(saved['per_class']) == ['polyp'] and saved['miou'] == pytest.approx(results['miou'])
    assert len(saved['episodes']) == 2
    for e in saved['episodes']:
        assert e['class'] == 'polyp' and e['query'] in truth and e['supports'][0] in truth
        assert e['supports'] != [e['query']]

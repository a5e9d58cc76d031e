r"""ABD-CT (Synapse NIfTI) and CMR (MS-CMRSeg C0 NIfTI): preparation against hand computations, orientation and
slice order, bad layouts and label codes, scripts/check_data.py, the volumetric folds generalised to 30 and 35
volumes, and test.py end to end on both (volumetric) and on CMR (2D episodes).

The fixtures (tests/fixtures_targets.py) are written in the exact raw layouts with nibabel, stored in different
orientations (LPS, RAS, LPI for CT; an oblique affine for CMR), with other organ codes that must become background
and hot voxels the intensity normalisation must clip.
"""
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import fixtures_targets as ft
from common.errors import UserError
from data import benchmarks_with_protocol, build_dataset
from data.abdct import prepare as prepare_abdct
from data.abdct import roi_grid, roi_resample
from data.cmr import prepare as prepare_cmr
from data.volumes import MANIFEST
from engine.volumetric import evaluate_volumetric, fold_size, support_volume, volumetric_folds
from test_chaos import METRIC_LINE, AllForeground

REPO = Path(__file__).resolve().parents[1]
ABD_CACHE = Path('Synapse') / 'prepared_abdct'
CMR_CACHE = Path('C0LET2_nii45_for_challenge19') / 'prepared_C0'
ABD_CLASSES = ['spleen', 'right kidney', 'left kidney', 'liver']
ABD_CODES = (1, 2, 3, 6)                                  # challenge codes of ABD_CLASSES
CMR_CLASSES = ['left ventricular myocardium', 'left ventricular blood pool', 'right ventricle']
FLIPS = {'LPS': (), 'RAS': (1, 2), 'LPI': (0,)}          # [D,H,W] axes a storage differs from L, P, S in


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f'script_{name}', REPO / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rewrite(path: Path, edit=None, data: np.ndarray | None = None) -> None:
    r"""Rewrite a NIfTI file with its own affine: its voxels changed in place by `edit`, or replaced by `data`."""
    import nibabel as nib
    img = nib.load(str(path))
    if data is None:
        data = np.asarray(img.dataobj).astype(np.float32)
        edit(data)
    ft.write_nifti(path, data, img.affine)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return fn(*args, **kwargs)


@pytest.fixture(scope='module')
def abd(tmp_path_factory):
    root = tmp_path_factory.mktemp('abdct')
    truth = ft.write_abdct(root)
    prepare_abdct(root)
    return root, truth


@pytest.fixture(scope='module')
def cmr(tmp_path_factory):
    root = tmp_path_factory.mktemp('cmr')
    truth = ft.write_cmr(root)
    prepare_cmr(root)
    return root, truth


# --- the volumetric folds ---------------------------------------------------------------------------------------
QNET_FOLDS = {     # ZJLAB-AMMI/Q-Net dataloaders/dataset_specifics.py get_folds: CHAOST2, SABS, CMR
    20: [range(0, 5), range(4, 9), range(8, 13), range(12, 17), [*range(16, 20), 0]],
    30: [range(0, 7), range(6, 13), range(12, 19), range(18, 25), [*range(24, 30), 0]],
    35: [range(0, 8), range(7, 15), range(14, 22), range(21, 29), [*range(28, 35), 0]],
}


def test_volumetric_folds_are_qnets_for_20_30_35_volumes_and_unchanged_up_to_24():
    for n, folds in QNET_FOLDS.items():
        assert volumetric_folds(n) == [sorted(f) for f in folds], n
    for n in range(2, 25):                                  # the former rule: 5 volumes from floor(f N / 5) on
        former = []
        for f in range(5):
            members = sorted({(f * n // 5 + j) % n for j in range(min(5, n))})
            if members not in former:
                former.append(members)
        assert volumetric_folds(n) == former, n
    assert [fold_size(n) for n in (4, 20, 24, 25, 30, 35)] == [4, 5, 5, 6, 7, 8]
    # Q-Net: position 2 of the fold in index order; SSL-ALPNet: the extra scan after _SEP[f+1] (SUPP_ID [6] on SABS)
    assert [support_volume(f, 30, 'qnet') for f in volumetric_folds(30)] == [2, 8, 14, 20, 25]
    assert [support_volume(f, 30, 'ssl-alpnet') for f in volumetric_folds(30)] == [6, 12, 18, 24, 0]
    assert [support_volume(f, 35, 'qnet') for f in volumetric_folds(35)] == [2, 9, 16, 23, 29]
    assert [support_volume(f, 35, 'ssl-alpnet') for f in volumetric_folds(35)] == [7, 14, 21, 28, 0]
    assert benchmarks_with_protocol('volumetric') == ['chaos', 'abd-ct', 'cmr']


# --- ABD-CT preparation ---------------------------------------------------------------------------------------------
def test_roi_grid_and_resampling_by_hand():
    border, scale, coords = roi_grid(512)
    assert border == 32 and scale == 1.75 and coords[:3].tolist() == [0, 1.75, 3.5] and coords[-1] == 255 * 1.75
    # bilinear sampling reproduces a ramp: output column i holds 32 + 1.75 i (SimpleITK's corner-aligned grid;
    # scipy.ndimage.zoom's would give 32 + 447 i / 255)
    ramp = np.broadcast_to(np.arange(512, dtype=np.float32), (1, 512, 512)).copy()
    label = np.zeros((1, 512, 512), np.uint8)
    label[0, :, 32 + 4:] = 1                     # organ 1 from cropped column 4 on: samples 0, 1.75, 3.5 (a tie), 5.25
    label[0, :, :32 + 2] = 2                     # organ 2 up to cropped column 1: sample 1.75 holds 0.25 of it
    out, lab, grid = roi_resample(ramp, label, n_classes=2)
    assert grid == {'roi_border_px': [32, 32], 'scale': [1.75, 1.75]} and out.shape == lab.shape == (1, 256, 256)
    np.testing.assert_allclose(out[0, 7], 32 + 1.75 * np.arange(256), rtol=0, atol=1e-4)
    out_rows, _, _ = roi_resample(ramp.transpose(0, 2, 1).copy(), label * 0)
    np.testing.assert_allclose(out_rows[0, :, 7], 32 + 1.75 * np.arange(256), rtol=0, atol=1e-4)
    # labels: an organ where its bilinear indicator exceeds 0.5 (SSL-ALPNet's rint; 0.5 itself is background)
    assert lab[0, 9, :5].tolist() == [2, 0, 0, 1, 1]
    # upsampling (the 16-pixel fixtures): border 1, scale 14/256, samples past the last pixel repeat it
    border, scale, coords = roi_grid(16)
    assert border == 1 and scale == 14 / 256 and coords.max() == 13 and coords[237] == pytest.approx(237 * 14 / 256)


def reference_ct(hu: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""SSL-ALPNet's steps written independently: window + min-max, then scipy's bilinear map_coordinates at the
    corner-aligned coordinates border + scale x i of every output pixel, labels as indicator > 0.5."""
    x = np.clip(hu, -125, 275)
    x = (x - x.min()) / (x.max() - x.min())
    n = hu.shape[1]
    b = round(n * 32 / 512)
    c = b + np.minimum((n - 2 * b) / 256 * np.arange(256), n - 2 * b - 1)
    grid = np.meshgrid(c, c, indexing='ij')
    image = np.stack([ndimage.map_coordinates(s, grid, order=1) for s in x])
    label = np.zeros(image.shape, np.uint8)
    for organ, code in enumerate(ABD_CODES, 1):
        member = np.stack([ndimage.map_coordinates((s == code).astype(float), grid, order=1) for s in codes])
        label[member > 0.5] = organ
    return image, label


def test_abdct_prepare_reproduces_window_roi_resampling_and_label_map(abd):
    root, truth = abd
    cache = root / ABD_CACHE
    manifest = json.loads((cache / MANIFEST).read_text())
    assert [v['pid'] for v in manifest['volumes']] == ['0001', '0002', '0005', '0010']      # numeric, with gaps
    assert manifest['classes'] == ABD_CLASSES and manifest['label_codes'] == dict(zip(ABD_CLASSES, ABD_CODES))
    for entry in manifest['volumes']:
        t = truth[entry['pid']]
        stored_hu, stored_codes = t['stored_hu'].transpose(2, 1, 0), t['stored_codes'].transpose(2, 1, 0)
        ref_image, ref_label = reference_ct(stored_hu.astype(np.float64), stored_codes)
        flips = FLIPS[t['storage']]
        image, label = np.load(cache / entry['image']), np.load(cache / entry['label'])
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == (5, 256, 256)
        np.testing.assert_allclose(image, np.flip(ref_image, flips), rtol=0, atol=2e-6)
        assert (label == np.flip(ref_label, flips)).all(), entry['pid']
        assert entry['stored_axes'] == t['storage'] and entry['flipped_axes'] == ['DHW'[a] for a in flips]
        for c, name in enumerate(ABD_CLASSES, 1):
            assert entry['organ_slices'][name] == np.flatnonzero((label == c).any((1, 2))).tolist()
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}          # stomach, aorta, pancreas became background
    # the window by hand, in the interior of the liver (70 HU; rows 2-6, columns 1-5 of the 16-pixel display grid)
    liver = np.load(cache / 'image_0001.npy')[2, 55, 55]
    assert liver == pytest.approx((70 + 125) / 400, abs=1e-6)
    # a volume without bone: its clipped maximum is 230 HU, so the min-max is (x + 125) / 355, not / 400
    assert manifest['volumes'][3]['window_min_max_hu'] == [-125.0, 230.0]
    assert np.load(cache / 'image_0010.npy')[2, 55, 55] == pytest.approx((70 + 125) / 355, abs=1e-6)
    assert manifest['volumes'][0]['spacing_zyx_mm'] == pytest.approx([3.0, 0.7 * 14 / 256, 0.7 * 14 / 256])


def test_abdct_orientation_is_one_for_every_storage(abd):
    r"""Stored as LPS, RAS (columns and rows mirrored) or LPI (slices reversed), every prepared volume shows the
    patient's right on the image's left (liver left of spleen, right kidney left of the left kidney), posterior at
    the bottom (kidneys below the liver) and slices from inferior to superior (the background level grows)."""
    root, truth = abd
    cache = root / ABD_CACHE
    assert {t['storage'] for t in truth.values()} == {'LPS', 'RAS', 'LPI'}
    for pid in truth:
        label, image = np.load(cache / f'label_{pid}.npy'), np.load(cache / f'image_{pid}.npy')
        centre = {c: np.argwhere(label == c).mean(0) for c in range(1, 5)}       # (z, row, column)
        assert centre[4][2] < 128 < centre[1][2], pid                          # liver left, spleen right
        assert centre[2][2] < 128 < centre[3][2], pid                          # right kidney left, left kidney right
        assert centre[2][1] > centre[4][1] and centre[3][1] > centre[1][1], pid  # kidneys posterior
        assert (np.diff(image[:, 64, 119]) > 0).all(), pid                     # background: -60 + 15 z HU
        assert centre[4][0] > centre[2][0], pid                                # liver above the right kidney


# --- CMR preparation ----------------------------------------------------------------------------------------------
def test_cmr_prepare_maps_codes_keeps_stored_order_and_clips_at_the_995th_percentile(cmr):
    root, truth = cmr
    cache = root / CMR_CACHE
    manifest = json.loads((cache / MANIFEST).read_text())
    assert [v['pid'] for v in manifest['volumes']] == ['1', '2', '10', '12']         # numeric order, 40 unlabelled
    assert manifest['classes'] == CMR_CLASSES
    for entry in manifest['volumes']:
        t = truth[entry['pid']]
        ids = np.select([t['codes'] == 200, t['codes'] == 500, t['codes'] == 600], [1, 2, 3], 0)
        label = np.load(cache / entry['label'])
        assert label.shape == (5, 16, 16) and (label == ids).all(), entry['pid']   # stored [k, j, i], not reoriented
        raw = t['image']
        clip = np.percentile(raw, 99.5)
        assert raw.max() == 6000 and clip < 6000
        expected = (np.minimum(raw, clip) - raw.min()) / (clip - raw.min())
        np.testing.assert_allclose(np.load(cache / entry['image']), expected, rtol=0, atol=1e-6)
        assert entry['clip_value'] == pytest.approx(clip) and entry['spacing_zyx_mm'] == pytest.approx([8, 1.25, 1.25])
        for c, name in enumerate(CMR_CLASSES, 1):
            assert entry['organ_slices'][name] == np.flatnonzero((ids == c).any((1, 2))).tolist()
    assert manifest['volumes'][1]['organ_slices']['left ventricular blood pool'] == [1, 2, 3, 4]   # base without
    assert manifest['volumes'][0]['organ_slices']['right ventricle'] == [0, 1, 2, 3]              # apex without


def test_cmr_flat_layout_and_the_2d_benchmark(tmp_path, cmr):
    ft.write_cmr(tmp_path, pids=(3, 4), flat=True, unlabelled=())
    out = prepare_cmr(tmp_path)
    assert out == tmp_path / CMR_CACHE
    assert json.loads((out / MANIFEST).read_text())['raw_root'].endswith('C0LET2_nii45_for_challenge19')
    root, truth = cmr
    ds = build_dataset('cmr', str(root), 'test', 2, 32)
    assert ds.class_names == CMR_CLASSES and ds.domain == 'target' and ds.volumes == ['1', '2', '10', '12']
    for c in range(3):
        code = (200, 500, 600)[c]
        expected = sorted(f'{pid}/{z:03d}' for pid, t in truth.items()
                          for z in np.flatnonzero((t['codes'] == code).any((1, 2))))
        assert ds.class_items[c] == expected
    assert (ds.read_mask('10/002', 2) == (truth['10']['codes'][2] == 600)).all()
    img = np.asarray(ds.read_image('10/002'))
    assert (img[..., 0] == np.rint(np.load(root / CMR_CACHE / 'image_10.npy')[2] * 255)).all()
    for e in ds.sample_episodes(60, 0):
        assert all(s.split('/')[0] != e.query.split('/')[0] for s in e.supports)


# --- errors ---------------------------------------------------------------------------------------------------------
def test_abdct_bad_layouts_and_codes_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r'no raw Synapse CT folder[\s\S]*Synapse/RawData/Training[\s\S]*img0001'):
        prepare_abdct(tmp_path)
    with pytest.raises(UserError, match=r'Synapse/RawData/Training does not exist[\s\S]*prepare_abdct\.py'):
        build_dataset('abd-ct', str(tmp_path), 'test', 1, 32)
    ft.write_abdct(tmp_path, pids=('0001', '0002', '0003', '0004', '0006'), n_slices=3, size=16)
    with pytest.raises(UserError, match=re.escape(f'python scripts/prepare_abdct.py --datapath {tmp_path}')):
        build_dataset('abd-ct', str(tmp_path), 'test', 1, 32)
    train = tmp_path / 'Synapse' / 'RawData' / 'Training'
    lab = train / 'label' / 'label0002.nii.gz'
    rewrite(lab, lambda d: d.__setitem__((slice(0, 2), 0, 0), [14, 2.5]))   # a code outside 0-13, a non-integer
    (train / 'label' / 'label0003.nii.gz').unlink()
    truncated = train / 'img' / 'img0001.nii.gz'
    truncated.write_bytes(truncated.read_bytes()[:100])            # a cut download
    rewrite(train / 'label' / 'label0004.nii.gz', data=np.zeros((16, 12, 3), np.uint8))
    with pytest.raises(UserError) as err:
        quiet(prepare_abdct, tmp_path)
    text = str(err.value)
    assert f'{lab}: label values outside the challenge codes 0-13: 2.5 (1 voxel), 14 (1 voxel)' in text
    assert f'{train / "label" / "label0003.nii.gz"} does not exist' in text
    assert f'{truncated}: is not a readable NIfTI volume' in text
    assert 'label0004.nii.gz: label is [3, 12, 16] (D, H, W) but image img0004.nii.gz is [3, 16, 16]' in text
    assert 'check_data.py --benchmark abd-ct' in text and 'Expected layout' in text
    assert not (tmp_path / ABD_CACHE).exists()                 # nothing half-written
    with pytest.warns(UserWarning, match='left out patients 0001, 0002, 0003, 0004'):
        out = prepare_abdct(tmp_path, skip_bad=True)
    assert [v['pid'] for v in json.loads((out / MANIFEST).read_text())['volumes']] == ['0006']


def test_cmr_bad_codes_and_folders_name_the_file(tmp_path, monkeypatch):
    ft.write_cmr(tmp_path, pids=(1, 2, 3), unlabelled=())
    base = tmp_path / 'C0LET2_nii45_for_challenge19'
    lab = base / 'c0gt' / 'patient2_C0_manual.nii.gz'
    rewrite(lab, lambda d: d.__setitem__((0, 0, slice(0, 3)), 300))        # not a code of the challenge
    (base / 'c0t2lge' / 'patient3_C0.nii.gz').unlink()
    with pytest.raises(UserError) as err:
        prepare_cmr(tmp_path)
    text = str(err.value)
    assert (f'{lab}: label values other than 0, 200 (LV myocardium), 500 (LV blood pool), 600 (RV): 300 (3 voxels)'
            in text)
    assert f'image {base / "c0t2lge" / "patient3_C0.nii.gz"} does not exist' in text
    (base / 'c0t2lge').rename(base / 'images')
    with pytest.raises(UserError, match=r'c0t2lge: folder does not exist \(the C0 images beside c0gt/\)'):
        prepare_cmr(tmp_path)
    monkeypatch.setitem(sys.modules, 'nibabel', None)           # nibabel not installed
    (base / 'images').rename(base / 'c0t2lge')
    with pytest.raises(UserError, match=r'needs nibabel: pip install "nibabel>=5\.0"'):
        prepare_cmr(tmp_path)


# --- scripts/check_data.py ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('benchmark', ['abd-ct', 'cmr'])
def test_a_cache_prepared_elsewhere_is_read_through_its_flag(tmp_path, abd, cmr, benchmark):
    r"""`prepare(..., out=DIR)` (scripts/prepare_*.py --out) then `--abd-ct-cache DIR` / `--cmr-cache DIR`: the loader
    reads that cache, with the same volumes as the default one; a folder without a cache names the prepare command."""
    root, prepare, option = (abd[0], prepare_abdct, 'abd_ct_cache') if benchmark == 'abd-ct' else \
        (cmr[0], prepare_cmr, 'cmr_cache')
    elsewhere = quiet(prepare, root, tmp_path / 'moved')
    default = build_dataset(benchmark, str(root), 'test', 1, 32)
    moved = build_dataset(benchmark, str(root), 'test', 1, 32, **{option: str(elsewhere)})
    assert moved.cache_dir == elsewhere != default.cache_dir and moved.volumes == default.volumes
    assert moved.class_items == default.class_items
    with pytest.raises(UserError, match=re.escape(f'scripts/prepare_{benchmark.replace("-", "")}.py')):
        build_dataset(benchmark, str(root), 'test', 1, 32, **{option: str(tmp_path / 'empty')})


@pytest.mark.parametrize('benchmark', ['abd-ct', 'cmr'])
def test_check_data_before_and_after_preparation(tmp_path, capsys, benchmark):
    check = load_script('check_data')
    if benchmark == 'abd-ct':
        ft.write_abdct(tmp_path, pids=('0001', '0003'), n_slices=3, size=16)
        script, first = load_script('prepare_abdct'), 'spleen'
        bad = tmp_path / 'Synapse' / 'RawData' / 'Training' / 'label' / 'label0003.nii.gz'
    else:
        ft.write_cmr(tmp_path, pids=(1, 2))
        script, first = load_script('prepare_cmr'), 'left ventricular myocardium'
        bad = tmp_path / 'C0LET2_nii45_for_challenge19' / 'c0gt' / 'patient2_C0_manual.nii.gz'
    rc = check.main(['--benchmark', benchmark, '--datapath', str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1 and 'the prepared cache does not exist yet' in out
    assert f'python scripts/prepare_{benchmark.replace("-", "")}.py --datapath {tmp_path}' in out
    manifest = script.main(['--datapath', str(tmp_path)])
    printed = capsys.readouterr().out
    n = len(manifest['volumes'])
    assert n == 2 and 'prepared 2 volumes' in printed and f'next: python test.py --benchmark {benchmark}' in printed
    items = sum(len(v['organ_slices'][first]) for v in manifest['volumes'])
    rc = check.main(['--benchmark', benchmark, '--datapath', str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and f'{first}: {items}' in out and 'raw NIfTI layout' in out
    if benchmark == 'cmr':
        assert 'C0 volumes without a manual label, not used: patients 40' in out
    rewrite(bad, lambda d: d.__setitem__((0, 0, 0), 99))
    rc = check.main(['--benchmark', benchmark, '--datapath', str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1 and 'unexpected mask values: 1 (1 ERROR)' in out and '99 (1 voxel)' in out and bad.name in out


# --- the volumetric protocol on the prepared grid -------------------------------------------------------------------
def test_volumetric_on_abdct_scores_3d_dice_on_the_256_grid(abd):
    r"""Four volumes: one fold [0, 1, 2, 3]; SSL-ALPNet's support is its last volume ('0010'), the queries the
    other three. An all-foreground prediction scores 2|G| / (|G| + evaluated voxels) on the 256 x 256 grid."""
    root, _ = abd
    ds = build_dataset('abd-ct', str(root), 'test', 1, 8)
    scores, tasks = evaluate_volumetric(AllForeground(), ds, torch.device('cpu'), 1, bsz=16, support_rule='ssl-alpnet')
    assert len(tasks) == 3 * 4 and {t['support'] for t in tasks} == {'0010'}
    for t in tasks:
        label = np.load(root / ABD_CACHE / f'label_{t["query"]}.npy') == t['class_id'] + 1
        g, total = int(label.sum()), len(t['query_slices']) * 256 * 256
        assert t['query_slices'] == np.flatnonzero(label.any((1, 2))).tolist()
        assert t['dice'] == pytest.approx(100 * 2 * g / (g + total))
    assert set(scores['per_class_dice']) == set(ABD_CLASSES)


# --- test.py end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('benchmark,protocol', [('abd-ct', 'volumetric'), ('cmr', 'volumetric'), ('cmr', '2d')])
def test_test_py_on_the_prepared_fixtures(abd, cmr, untrained_checkpoint, tmp_path, capsys, benchmark, protocol):
    import test as test_cli
    root, classes = (abd[0], ABD_CLASSES) if benchmark == 'abd-ct' else (cmr[0], CMR_CLASSES)
    quiet(test_cli.main, ['--load', str(untrained_checkpoint), '--benchmark', benchmark, '--datapath', str(root),
                          '--protocol', protocol, '--episodes', '3', '--bsz', '8', '--workers', '0',
                          '--device', 'cpu', '--logpath', str(tmp_path / 'run')])
    assert METRIC_LINE.search(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert saved['protocol'] == protocol and saved['benchmark'] == benchmark
    if protocol == 'volumetric':
        assert set(saved['per_class_dice']) == set(classes)
        support = '0005' if benchmark == 'abd-ct' else '10'         # 4 volumes: one fold, Q-Net's position 2
        assert len(saved['tasks']) == 3 * len(classes) and {t['support'] for t in saved['tasks']} == {support}
        assert saved['dice'] == pytest.approx(np.mean(list(saved['per_class_dice'].values())))
        assert saved['per_fold'] == {'0': saved['per_class_dice']}
    else:
        assert len(saved['episodes']) == 3
        assert [e['class'] for e in saved['episodes']] == CMR_CLASSES

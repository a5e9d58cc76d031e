r"""CHAOS: DICOM preparation (real pydicom files stored out of order), the 2D benchmark, and the volumetric protocol.

Fixture slices encode their true position in their intensity (100 z + 200, organs +300) and carry the organ labels
of that position in the Ground PNG of the same stem, so sorting and pairing errors are visible.
"""
import json
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import fixtures_targets as ft
from common.errors import UserError
from engine.volumetric import (chunk_bounds, evaluate_volumetric, support_slice_indices, support_volume,
                               volumetric_folds)
from data import build_dataset
from model import FewShotSegmenter, Output
from data.chaos import CACHE_NAME, LABEL_LUT, MANIFEST, labels_from_png, order_slices, prepare

CHAOS_PIDS = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)
METRIC_LINE = re.compile(r'mIoU: \d+\.\d\d  FB-IoU: \d+\.\d\d  Dice: \d+\.\d\d')


def prepared(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return prepare(root, **kwargs)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    r"""Four patients: axial, coronal, axial, and one without position tags (InstanceNumber order)."""
    root = tmp_path_factory.mktemp('chaos')
    truth = ft.write_chaos(root, pids=(1, 2, 3, 5), orders={5: 'instance'})
    with pytest.warns(UserWarning, match='patient 5: slices sorted by InstanceNumber'):
        prepare(root)
    return root, truth


# --- preparation --------------------------------------------------------------------------------------------------
def test_prepare_restores_slice_order_and_label_pairing(small):
    root, truth = small
    cache = root / 'CHAOS' / CACHE_NAME
    manifest = json.loads((cache / MANIFEST).read_text())
    assert [v['pid'] for v in manifest['volumes']] == ['1', '2', '3', '5']
    assert {v['pid']: v['order'] for v in manifest['volumes']} == {'1': 'position', '2': 'position', '3': 'position',
                                                                   '5': 'instance'}
    for entry in manifest['volumes']:
        pid = entry['pid']
        label = np.load(cache / entry['label'])
        assert (label == truth[pid]['label']).all(), pid          # stems paired, slices in anatomical order
        image = np.load(cache / entry['image'])
        background = image[:, 8, 8]                               # no organ there: level grows with z
        assert (np.diff(background) > 0).all(), pid
        # the files were stored out of order: file k holds true slice perm[k]
        assert entry['slices'] == [f'IMG-0002-{k + 1:05d}' for k in np.argsort(truth[pid]['perm'])]
        for name, c in zip(('liver', 'right kidney', 'left kidney', 'spleen'), range(1, 5)):
            assert entry['organ_slices'][name] == np.flatnonzero((truth[pid]['label'] == c).any((1, 2))).tolist()
    assert manifest['volumes'][0]['spacing_zyx_mm'] == pytest.approx([7.7, 1.5, 1.5])


def test_prepare_clips_at_the_995th_percentile_and_scales_per_volume(small):
    root, truth = small
    lab = truth['1']['label']
    raw = np.stack([ft.chaos_intensity(z, lab[z], 0) for z in range(lab.shape[0])]).astype(np.float64)
    clip = np.percentile(raw, 99.5)
    assert raw.max() == 4000 and clip < 4000                      # the hot voxel lies above the percentile
    expected = (np.minimum(raw, clip) - raw.min()) / (clip - raw.min())
    image = np.load(root / 'CHAOS' / CACHE_NAME / 'image_1.npy')
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image[0, 0, 0] == pytest.approx(1.0)


def test_order_slices_position_instance_file():
    class H(dict):
        def get(self, key, default=None):
            return dict.get(self, key, default)

    axial = [1, 0, 0, 0, 1, 0]
    headers = [H(ImagePositionPatient=[0, 0, z], ImageOrientationPatient=axial, InstanceNumber=n)
               for z, n in ((5.0, 1), (-2.0, 2), (1.0, 3))]
    assert order_slices(headers) == ([1, 2, 0], 'position')
    coronal = [1, 0, 0, 0, 0, -1]                                 # normal +y: z coordinates are irrelevant
    headers = [H(ImagePositionPatient=[0, y, 9 - y], ImageOrientationPatient=coronal, InstanceNumber=n)
               for y, n in ((3.0, 1), (1.0, 2), (2.0, 3))]
    assert order_slices(headers) == ([1, 2, 0], 'position')
    headers = [H(InstanceNumber=n) for n in (3, 1, 2)]
    assert order_slices(headers) == ([1, 2, 0], 'instance')
    assert order_slices([H(), H()]) == ([0, 1], 'file')


def test_label_ranges_and_rejection(tmp_path):
    for value, organ in ((0, 0), (55, 1), (63, 1), (70, 1), (110, 2), (126, 2), (135, 2), (175, 3), (189, 3),
                         (200, 3), (240, 4), (252, 4), (255, 4)):
        assert LABEL_LUT[value] == organ, value
    for value in (1, 54, 71, 100, 109, 136, 174, 201, 239):
        assert LABEL_LUT[value] == 255, value
    path = tmp_path / 'IMG-0002-00001.png'
    arr = np.zeros((6, 6), np.uint8)
    arr[0, 0], arr[1, 1] = 63, 100
    Image.fromarray(arr).save(path)
    with pytest.raises(UserError, match=r'IMG-0002-00001\.png has gray values outside.*100 \(1 px\)'):
        labels_from_png(path)


def test_prepare_errors_name_the_file_and_skip_bad(tmp_path):
    with pytest.raises(UserError, match=r'no raw CHAOS MR folder[\s\S]*Train_Sets/MR'):
        prepare(tmp_path)
    ft.write_chaos(tmp_path, pids=(1, 2, 3), n_slices=4, size=12)
    mr = tmp_path / 'CHAOS' / 'Train_Sets' / 'MR'
    bad_label = mr / '2' / 'T2SPIR' / 'Ground' / 'IMG-0002-00002.png'
    arr = np.asarray(Image.open(bad_label)).copy()
    arr[0, 0] = 100
    Image.fromarray(arr).save(bad_label)
    (mr / '3' / 'T2SPIR' / 'Ground' / 'IMG-0002-00003.png').unlink()
    dcm = mr / '1' / 'T2SPIR' / 'DICOM_anon' / 'IMG-0002-00001.dcm'
    dcm.write_bytes(dcm.read_bytes()[:200])
    with pytest.raises(UserError) as err:
        prepared(tmp_path)
    text = str(err.value)
    assert str(bad_label) in text and '100 (1 px)' in text
    assert 'IMG-0002-00003.dcm' in text and 'IMG-0002-00001.dcm' in text
    assert not (tmp_path / 'CHAOS' / CACHE_NAME).exists()          # nothing half-written
    ft.write_chaos(tmp_path, pids=(4, 6), n_slices=4, size=12)
    with pytest.warns(UserWarning, match='left out patients 1, 2, 3'):
        out = prepare(tmp_path, skip_bad=True)
    manifest = json.loads((out / MANIFEST).read_text())
    assert [v['pid'] for v in manifest['volumes']] == ['4', '6'] and manifest['skipped'] == ['1', '2', '3']
    with pytest.raises(UserError, match='--overwrite'):
        prepare(tmp_path, skip_bad=True)


# --- the 2D benchmark ---------------------------------------------------------------------------------------------
def test_chaos_2d_items_masks_and_cross_patient_supports(small):
    root, truth = small
    ds = build_dataset('chaos', str(root), 'test', 3, 32)
    assert ds.class_names == ['liver', 'right kidney', 'left kidney', 'spleen'] and ds.domain == 'target'
    for c in range(4):
        expected = sorted(f'{pid}/{z:03d}' for pid, t in truth.items()
                          for z in np.flatnonzero((t['label'] == c + 1).any((1, 2))))
        assert ds.class_items[c] == expected
    pid, z = '2', 3
    assert (ds.read_mask(f'{pid}/{z:03d}', 0) == (truth[pid]['label'][z] == 1)).all()
    img = np.asarray(ds.read_image(f'{pid}/{z:03d}'))
    cache = np.load(root / 'CHAOS' / CACHE_NAME / 'image_2.npy')
    assert img.shape == (16, 16, 3) and (img[..., 0] == np.rint(cache[z] * 255)).all()
    episodes = ds.sample_episodes(200, 0)
    assert episodes == ds.sample_episodes(200, 0)
    for e in episodes:
        assert all(s.split('/')[0] != e.query.split('/')[0] for s in e.supports)
    batch = ds[episodes[0]]
    assert batch['support_imgs'].shape == (3, 3, 32, 32) and set(batch['query_mask'].unique().tolist()) <= {0, 1}


def test_chaos_loader_errors(tmp_path, small):
    root, _ = small
    with pytest.raises(UserError, match=r'CHAOS/Train_Sets/MR does not exist[\s\S]*prepare_chaos'):
        build_dataset('chaos', str(tmp_path), 'test', 1, 32)
    ft.write_chaos(tmp_path, pids=(1, 2), n_slices=4, size=12)
    with pytest.raises(UserError, match=re.escape(f'python scripts/prepare_chaos.py --datapath {tmp_path}')):
        build_dataset('chaos', str(tmp_path), 'test', 1, 32)
    moved = tmp_path / 'elsewhere'
    prepared(tmp_path, out=moved)
    assert len(build_dataset('chaos', str(tmp_path), 'test', 1, 32, chaos_cache=str(moved)).volumes) == 2
    manifest = json.loads((moved / MANIFEST).read_text())
    manifest['version'] = 0
    (moved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match='another version of the preparation.*--overwrite'):
        build_dataset('chaos', str(tmp_path), 'test', 1, 32, chaos_cache=str(moved))
    manifest['version'] = 1
    (moved / MANIFEST).write_text(json.dumps(manifest))
    (moved / 'label_2.npy').unlink()
    with pytest.raises(UserError, match=r'label_2\.npy'):
        build_dataset('chaos', str(tmp_path), 'test', 1, 32, chaos_cache=str(moved))


# --- the volumetric protocol --------------------------------------------------------------------------------------
def test_folds_support_positions_and_chunks_by_hand():
    assert volumetric_folds(20) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 16],
                                    [0, 16, 17, 18, 19]]
    assert [f[2] for f in volumetric_folds(20)] == [2, 6, 10, 14, 17]
    assert volumetric_folds(4) == [[0, 1, 2, 3]]
    assert len(volumetric_folds(6)) == 5
    with pytest.raises(UserError, match='at least 2'):
        volumetric_folds(1)
    # 1-shot: positions 1/6, 1/2, 5/6 of the organ slices (int): 12 -> 2, 6, 10; 7 -> 1, 3, 5 (7/6, 7/2, 35/6)
    assert support_slice_indices(12, 1) == [[2], [6], [10]]
    assert support_slice_indices(7, 1) == [[1], [3], [5]]
    # K-shot: centres of 3K equal parts, K per chunk: 12 slices, K=2 -> (2i+1)/12 * 12 = 1, 3, 5, 7, 9, 11
    assert support_slice_indices(12, 2) == [[1, 3], [5, 7], [9, 11]]
    assert chunk_bounds(7) == [0, 2, 4, 7] and chunk_bounds(2) == [0, 0, 1, 2]


class _ImageTaps(nn.Module):
    r"""A stand-in backbone whose only tap is the image itself."""
    channels, stage_ids = [3], [1]

    def forward(self, img):
        return [img]


class AllForeground(FewShotSegmenter):
    r"""Predicts foreground everywhere and records which query and support images each `match` received, and how
    often the protocol went through the test-time entry point `infer` (where methods with test-time adaptation,
    e.g. PATNet --finetune-steps, adapt), which it must use as the 2D episodes do."""
    kshot = 'vote'
    plugin_point = 'features'
    match_shots = 'all'          # one `match` per episode with all K supports (the per-shot split is tested apart)

    def __init__(self):
        super().__init__(_ImageTaps())
        self.calls, self.inferred = [], 0

    def infer(self, record):
        self.inferred += record.batch
        return super().infer(record)

    def match(self, record):
        for b in range(record.batch):
            self.calls.append((record.query_img[b].clone(), record.supports.imgs[b].clone(),
                               int(record.ctx.class_id[b])))
        logits = torch.zeros(record.batch, record.nshot, 2, *record.image_size)
        logits[:, :, 1] = 1.0
        return Output(logits)


@pytest.mark.parametrize('nshot', [1, 2])
@pytest.mark.slow
def test_volumetric_protocol_on_20_volumes_by_hand(tmp_path, nshot):
    truth = ft.write_chaos(tmp_path, pids=CHAOS_PIDS, n_slices=5, size=8)
    prepared(tmp_path)
    ds = build_dataset('chaos', str(tmp_path), 'test', nshot, 8)
    assert ds.volumes == [str(p) for p in CHAOS_PIDS]               # numeric order: '8' before '10'
    model = AllForeground()
    scores, tasks = evaluate_volumetric(model, ds, torch.device('cpu'), nshot, bsz=3)
    assert len(tasks) == 5 * 4 * 4
    assert sorted({t['support'] for t in tasks}, key=int) == ['3', '13', '21', '33', '37']
    fingerprint = {}
    for pid in ds.volumes:
        for z in range(5):
            fingerprint[ds.load_slice(pid, z, 0)[0].numpy().tobytes()] = (pid, z)
    assert len(fingerprint) == 20 * 5                              # every slice is told apart by its pixels
    assert model.inferred == len(model.calls) > 0                  # every prediction through the entry point
    seen = {}
    for q, s, c in model.calls:
        seen.setdefault((fingerprint[q.numpy().tobytes()], c), []).append(
            [fingerprint[x.numpy().tobytes()] for x in s])
    dice_by_organ = {}
    for t in tasks:
        c = t['class_id']
        q_lab, s_lab = truth[t['query']]['label'] == c + 1, truth[t['support']]['label'] == c + 1
        q_slices = np.flatnonzero(q_lab.any((1, 2))).tolist()
        s_slices = np.flatnonzero(s_lab.any((1, 2))).tolist()
        assert t['query_slices'] == q_slices
        # the support slices of chunk j, by hand: int(p * C) for p = (j + (k + 1/2) / K) / 3
        hand = [[s_slices[int((j + (k + 0.5) / nshot) / 3 * len(s_slices) + 1e-9)] for k in range(nshot)]
                for j in range(3)]
        assert t['support_slices'] == hand
        bounds = np.linspace(0, len(q_slices), 4).astype(int)
        for j in range(3):
            for z in q_slices[bounds[j]:bounds[j + 1]]:
                assert [(t['support'], zs) for zs in hand[j]] in seen[((t['query'], z), c)]
        # all-foreground prediction: TP = |G|, FP = the other voxels of the evaluated slices, FN = 0
        g = int(q_lab.sum())
        total = len(q_slices) * 8 * 8
        assert t['dice'] == pytest.approx(100 * 2 * g / (g + total))
        assert t['iou'] == pytest.approx(100 * g / total)
        dice_by_organ.setdefault(t['organ'], {}).setdefault(t['fold'], []).append(t['dice'])
    for organ, folds in dice_by_organ.items():
        assert scores['per_class_dice'][organ] == pytest.approx(np.mean([np.mean(v) for v in folds.values()]))
    assert scores['dice'] == pytest.approx(np.mean(list(scores['per_class_dice'].values())))
    # FB-IoU: background is never predicted -> background IoU 0; foreground IoU pooled over all evaluated slices
    g_all = sum(int((truth[t['query']]['label'] == t['class_id'] + 1).sum()) for t in tasks)
    n_all = sum(len(t['query_slices']) * 64 for t in tasks)
    assert scores['fbiou'] == pytest.approx(100 * (0 + g_all / n_all) / 2)


def test_volumetric_skips_an_organ_missing_in_a_volume(tmp_path):
    ft.write_chaos(tmp_path, pids=(1, 2, 3), n_slices=4, size=8)
    spleen = tmp_path / 'CHAOS' / 'Train_Sets' / 'MR' / '1' / 'T2SPIR' / 'Ground'
    for png in spleen.glob('*.png'):                               # patient 1 loses its spleen label
        arr = np.asarray(Image.open(png)).copy()
        arr[arr >= 240] = 0
        Image.fromarray(arr).save(png)
    prepared(tmp_path)
    ds = build_dataset('chaos', str(tmp_path), 'test', 1, 8)
    scores, tasks = evaluate_volumetric(AllForeground(), ds, torch.device('cpu'), 1)
    skipped = [t for t in tasks if 'skipped' in t]
    assert [(t['query'], t['organ']) for t in skipped] == [('1', 'spleen')]
    assert scores['episodes_per_class']['spleen'] == 1 and scores['episodes_per_class']['liver'] == 2


def test_qnet_and_ssl_alpnet_support_volumes_on_six_volumes(tmp_path):
    r"""Six volumes, folds from floor(6f/5): {0-4}, {1-5}, {2-5,0}, {3-5,0,1}, {4,5,0,1,2}. Q-Net (supp_idx 2 of the
    fold in index order): 2, 3, 3, 3, 2. SSL-ALPNet (the fold's fifth scan in circular order, SUPP_ID [4]):
    4, 5, 0, 1, 2. The other four volumes of a fold are its queries. For the 20 CHAOS volumes: 2, 6, 10, 14, 17
    against 4, 8, 12, 16, 0."""
    folds = volumetric_folds(6)
    assert [support_volume(f, 6, 'qnet') for f in folds] == [2, 3, 3, 3, 2]
    assert [support_volume(f, 6, 'ssl-alpnet') for f in folds] == [4, 5, 0, 1, 2]
    assert [support_volume(f, 20, 'ssl-alpnet') for f in volumetric_folds(20)] == [4, 8, 12, 16, 0]
    with pytest.raises(UserError, match='--volumetric-support'):
        support_volume(folds[0], 6, 'adnet')
    pids = (1, 2, 3, 5, 8, 10)
    ft.write_chaos(tmp_path, pids=pids, n_slices=3, size=8)
    prepared(tmp_path)
    ds = build_dataset('chaos', str(tmp_path), 'test', 1, 8)
    for rule, expected in (('qnet', [2, 3, 3, 3, 2]), ('ssl-alpnet', [4, 5, 0, 1, 2])):
        scores, tasks = evaluate_volumetric(AllForeground(), ds, torch.device('cpu'), 1, bsz=8, support_rule=rule)
        for f, fold in enumerate(folds):
            fold_tasks = [t for t in tasks if t['fold'] == f]
            assert {t['support'] for t in fold_tasks} == {str(pids[expected[f]])}
            assert {t['query'] for t in fold_tasks} == {str(pids[i]) for i in fold if i != expected[f]}
            assert all(t['support_rule'] == rule for t in fold_tasks)
        assert scores['metric']['miou_over'] == 'all' and scores['classes_without_episodes'] == []


# --- end to end ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    r"""Three patients of three slices: the smallest CHAOS that exercises both protocols through test.py."""
    root = tmp_path_factory.mktemp('chaos-tiny')
    ft.write_chaos(root, pids=(1, 2, 3), n_slices=3, size=16)
    prepared(root)
    return root


@pytest.mark.parametrize('protocol', ['2d', 'volumetric'])
@pytest.mark.parametrize('nshot', [1, 5])
@pytest.mark.slow
def test_test_py_chaos_both_protocols(tiny, untrained_checkpoint, tmp_path, capsys, protocol, nshot):
    import test as test_cli
    root = tiny
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        test_cli.main(['--load', str(untrained_checkpoint), '--benchmark', 'chaos', '--datapath', str(root), '--nshot',
                       str(nshot), '--protocol', protocol, '--episodes', '4', '--bsz', '8', '--workers', '0',
                       '--device', 'cpu', '--logpath', str(tmp_path / 'run')])
    assert METRIC_LINE.search(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert saved['protocol'] == protocol and saved['nshot'] == nshot
    assert set(saved['per_class_dice']) == {'liver', 'right kidney', 'left kidney', 'spleen'}
    if protocol == 'volumetric':
        assert len(saved['tasks']) == 4 * 2 and saved['tasks'][0]['support'] == '3'   # 3 volumes: one fold
        assert all(len(s) == nshot for t in saved['tasks'] for s in t['support_slices'])
        assert saved['dice'] == pytest.approx(np.mean(list(saved['per_class_dice'].values())))
        assert saved['per_fold'] == {'0': saved['per_class_dice']}
    else:
        assert len(saved['episodes']) == 4


def test_volumetric_protocol_is_refused_for_2d_benchmarks(untrained_checkpoint, tmp_path):
    import test as test_cli
    with pytest.raises(UserError, match='--protocol volumetric applies to volumetric benchmarks'):
        test_cli.main(['--load', str(untrained_checkpoint), '--benchmark', 'lung', '--datapath', str(tmp_path),
                       '--protocol', 'volumetric', '--device', 'cpu'])


# --- remaining error paths ----------------------------------------------------------------------------------------
def _label_too_small(mr):
    png = mr / '2' / 'T2SPIR' / 'Ground' / 'IMG-0002-00001.png'
    Image.open(png).resize((6, 6), Image.NEAREST).save(png)


def _slice_of_other_size(mr):
    from pydicom import dcmread
    path = mr / '2' / 'T2SPIR' / 'DICOM_anon' / 'IMG-0002-00002.dcm'
    ds = dcmread(path)
    ds.Rows, ds.Columns = 4, 4
    ds.PixelData = np.zeros((4, 4), '<u2').tobytes()
    ds.save_as(path)
    png = mr / '2' / 'T2SPIR' / 'Ground' / 'IMG-0002-00002.png'
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)


RAW_ERRORS = {
    'no Ground folder': (lambda mr: __import__('shutil').rmtree(mr / '2' / 'T2SPIR' / 'Ground'),
                         r'2/T2SPIR/Ground: folder does not exist'),
    'no DICOM slice': (lambda mr: [p.unlink() for p in (mr / '2' / 'T2SPIR' / 'DICOM_anon').glob('*.dcm')],
                       r'DICOM_anon/\*\.dcm: no DICOM slice'),
    'label of another size': (_label_too_small, r'label is 6x6 but slice IMG-0002-00001\.dcm is 8x8'),
    'series of mixed sizes': (_slice_of_other_size, r'slices of one series differ in size'),
}


@pytest.mark.parametrize('case', sorted(RAW_ERRORS))
def test_prepare_error_paths(tmp_path, case):
    mutate, message = RAW_ERRORS[case]
    ft.write_chaos(tmp_path, pids=(1, 2), n_slices=3, size=8)
    mutate(tmp_path / 'CHAOS' / 'Train_Sets' / 'MR')
    with pytest.raises(UserError, match=message):
        prepared(tmp_path)


def test_damaged_cache_errors(tmp_path):
    ft.write_chaos(tmp_path, pids=(1, 2, 3), n_slices=3, size=8)
    cache = prepared(tmp_path)
    np.save(cache / 'image_3.npy', np.zeros((2, 8, 8), np.float32))
    with pytest.raises(UserError, match=r'image_3\.npy: shape \[2, 8, 8\] but the manifest says \[3, 8, 8\]'):
        build_dataset('chaos', str(tmp_path), 'test', 1, 8)
    with pytest.warns(UserWarning, match='left out 1 items'):
        assert build_dataset('chaos', str(tmp_path), 'test', 1, 8, skip_bad=True).volumes == ['1', '2']
    (cache / MANIFEST).write_text('{ not json')
    with pytest.raises(UserError, match=r'manifest\.json is unreadable.*--overwrite'):
        build_dataset('chaos', str(tmp_path), 'test', 1, 8)


def test_volumetric_with_no_common_organ_and_vis_are_errors(tmp_path, untrained_checkpoint):
    import test as test_cli
    ft.write_chaos(tmp_path, pids=(1, 2, 3), n_slices=3, size=8)
    for png in (tmp_path / 'CHAOS' / 'Train_Sets' / 'MR' / '3' / 'T2SPIR' / 'Ground').glob('*.png'):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)       # the support volume has no organ at all
    prepared(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ds = build_dataset('chaos', str(tmp_path), 'test', 1, 8)
        with pytest.raises(UserError, match='evaluated nothing'):
            evaluate_volumetric(AllForeground(), ds, torch.device('cpu'), 1)
    with pytest.raises(UserError, match='--vis draws 2D episodes'):
        test_cli.main(['--load', str(untrained_checkpoint), '--benchmark', 'chaos', '--datapath', str(tmp_path),
                       '--protocol', 'volumetric', '--vis', '2', '--device', 'cpu'])

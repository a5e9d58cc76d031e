r"""ISIC, Chest X-ray, WBC, FSS-1000 and Deepglobe read from fixtures in their real layouts, plus the shared checks.

Fixture images are dark with a bright region exactly where their own mask is foreground, so thresholding a loaded
image tells whether it was paired with the right mask.
"""
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
from data import DATASETS, build_dataset, build_loader
from data.checks import DataReport, inspect_file
from data.episodic import FixedEpisodes
from data.fss import derived_split
from data.isic import normalise_class, read_class_csv
from data.wbc import snap_mask

METRIC_LINE = re.compile(r'mIoU: \d+\.\d\d  FB-IoU: \d+\.\d\d  Dice: \d+\.\d\d')


def build(name, root, split='test', nshot=1, size=32, **options):
    return build_dataset(name, str(root), split, nshot, size, **options)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def corrupt_png_data(path):
    r"""Damage the compressed pixel data but keep the header and the IEND chunk (only a full decode notices)."""
    data = bytearray(path.read_bytes())
    start = data.index(b'IDAT') + 8
    for i in range(start, min(start + 12, len(data) - 16)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_pairing(ds, key, class_id):
    r"""The loaded mask must be the foreground of the loaded image (bright pixels), pixel for pixel."""
    img = np.asarray(ds.read_image(key).convert('L'))
    mask = ds.read_mask(key, class_id)
    assert mask.shape == img.shape
    assert set(np.unique(mask)) <= {0, 1}
    assert (mask == (img > 128)).all(), key


@pytest.fixture(scope='module')
def targets(tmp_path_factory):
    root = tmp_path_factory.mktemp('targets')
    facts = {'isic': ft.write_isic(root), 'lung': ft.write_lung(root), 'wbc': ft.write_wbc(root)}
    ft.write_deepglobe(root)
    facts['fss'] = ft.write_fss(root)
    return root, facts


# --- ISIC ---------------------------------------------------------------------------------------------------------
def test_isic_classes_counts_and_pairing_from_crlf_csv(targets):
    root, facts = targets
    ds = build('isic', root)
    assert ds.class_names == ['melanoma', 'nevus', 'seborrheic keratosis']
    expected = {c: sorted(k for k, v in facts['isic'].items() if v == c) for c in ds.class_names}
    assert {c: ds.class_items[i] for i, c in enumerate(ds.class_names)} == expected
    assert [len(v) for v in expected.values()] == [4, 6, 3]
    for c, items in enumerate(ds.class_items):
        for key in items:
            assert_pairing(ds, key, c)


@pytest.mark.parametrize('root_name,csv,spelling', [('ISIC', 'lf', 'seborrheic keratosis'),
                                                     ('ISIC2018', 'crlf', 'Seborrheic_Keratosis')])
def test_isic_root_and_csv_variants(tmp_path, root_name, csv, spelling):
    facts = ft.write_isic(tmp_path, root=root_name, csv=csv, sk_spelling=spelling)
    ds = build('isic', tmp_path)
    sk = ds.class_items[ds.class_names.index('seborrheic keratosis')]
    assert sk == sorted(k for k, v in facts.items() if v == 'seborrheic keratosis') and len(sk) == 3


def test_read_class_csv_bom_crlf_header_blank_lines(tmp_path):
    path = tmp_path / 'c.csv'
    path.write_bytes(b'\xef\xbb\xbfID,Class\r\nISIC_1,nevus\r\n\r\nISIC_2.jpg, seborrheic_keratosis \r\n'
                     b'ISIC_3,Melanoma\r\n')
    assert read_class_csv(path) == {'ISIC_1': 'nevus', 'ISIC_2': 'seborrheic keratosis', 'ISIC_3': 'melanoma'}
    assert normalise_class(' Seborrheic-keratosis') == 'seborrheic keratosis'


@pytest.mark.parametrize('content,message', [
    (b'ID,Class\r\nISIC_1,basal cell carcinoma\r\n', r'c\.csv:2: unknown class'),
    (b'ID,Class\r\nISIC_1\r\n', r'c\.csv:2: expected "ID,Class"'),
    (b'ID,Class\r\nISIC_1,nevus\r\nISIC_1,melanoma\r\n', 'listed as both'),
    (b'ID,Class\r\n', 'lists no image'),
])
def test_read_class_csv_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / 'c.csv'
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_class_csv(path)


def test_isic_without_class_information_is_one_lesion_class_with_a_warning(tmp_path):
    ft.write_isic(tmp_path, csv=None)
    with pytest.warns(UserWarning, match='no class information.*class_id.csv'):
        ds = build('isic', tmp_path)
    assert ds.class_names == ['lesion'] and len(ds.class_items[0]) == len(ft.ISIC_CLASSES)


def test_isic_class_csv_override(tmp_path):
    facts = ft.write_isic(tmp_path, csv=None)
    other = tmp_path / 'elsewhere.csv'
    other.write_text('ID,Class\n' + '\n'.join(f'{k},melanoma' for k in facts) + '\n')
    ds = build('isic', tmp_path, isic_classes=str(other))
    assert ds.usable_classes == [0] and len(ds.class_items[0]) == len(facts)


def test_isic_patnet_class_folders(tmp_path):
    folders = {'melanoma': 1, 'nevus': 2, 'seborrheic_keratosis': 3}        # CD_TG's ISIC_Split.py numbering
    facts = ft.write_isic(tmp_path, csv='crlf', sorted_folders=folders)
    ds = build('isic', tmp_path)                                            # classes from the CSV
    assert ds.class_items[ds.class_names.index('melanoma')] == sorted(k for k, v in facts.items() if v == 'melanoma')
    key = ds.class_items[0][0]
    assert ds._paths[key][0].parent.name == '1'
    assert_pairing(ds, key, 0)
    (tmp_path / 'ISIC2018' / 'class_id.csv').unlink()
    with pytest.warns(UserWarning, match='folders 1/ 2/ 3/ are not used'):
        assert build('isic', tmp_path).class_names == ['lesion']
    named = build('isic', tmp_path, isic_classes='melanoma,nevus,seborrheic keratosis')
    assert named.class_items[named.class_names.index('nevus')] == sorted(k for k, v in facts.items() if v == 'nevus')
    with pytest.raises(UserError, match='must name each of'):
        build('isic', tmp_path, isic_classes='nevus,nevus,melanoma')
    with pytest.raises(UserError, match='no such file'):
        build('isic', tmp_path, isic_classes=str(tmp_path / 'missing.csv'))


def test_isic_folder_names_need_class_folders(tmp_path):
    ft.write_isic(tmp_path)
    with pytest.raises(UserError, match='has no class folders'):
        build('isic', tmp_path, isic_classes='melanoma,nevus,seborrheic keratosis')


def test_isic_resized_copies_in_class_folders_are_explained(tmp_path):
    ft.write_isic(tmp_path, sorted_folders={'melanoma': 1, 'nevus': 2, 'seborrheic_keratosis': 3})
    some = next((tmp_path / 'ISIC2018' / 'ISIC2018_Task1-2_Training_Input' / '2').glob('*.jpg'))
    Image.open(some).resize((51, 51)).save(some)
    with pytest.raises(UserError, match=r'size mismatch.*' + some.stem):
        build('isic', tmp_path)
    report = DATASETS['isic'].check(tmp_path)
    assert any('resized copies' in n for n in report.notes)


def test_isic_missing_folder_names_path_and_layout(tmp_path):
    with pytest.raises(UserError) as err:
        build('isic', tmp_path)
    text = str(err.value)
    assert str(tmp_path / 'ISIC2018' / 'ISIC2018_Task1-2_Training_Input') in text and 'Expected layout' in text
    ft.write_isic(tmp_path)
    shutil.rmtree(tmp_path / 'ISIC2018' / 'ISIC2018_Task1_Training_GroundTruth')
    with pytest.raises(UserError, match='ISIC2018_Task1_Training_GroundTruth does not exist'):
        build('isic', tmp_path)


def test_isic_missing_and_corrupt_files_error_or_skip(tmp_path):
    facts = ft.write_isic(tmp_path)
    ids = sorted(facts)
    base = tmp_path / 'ISIC2018'
    (base / 'ISIC2018_Task1-2_Training_Input' / f'{ids[0]}.jpg').unlink()                    # mask without image
    (base / 'ISIC2018_Task1_Training_GroundTruth' / f'{ids[1]}_segmentation.png').unlink()   # image without mask
    truncate(base / 'ISIC2018_Task1-2_Training_Input' / f'{ids[2]}.jpg')                      # truncated JPEG
    truncate(base / 'ISIC2018_Task1_Training_GroundTruth' / f'{ids[3]}_segmentation.png')     # truncated PNG
    with pytest.raises(UserError) as err:
        build('isic', tmp_path)
    text = str(err.value)
    for i in range(4):
        assert ids[i] in text
    assert '--skip-bad' in text and 'check_data.py' in text
    with pytest.warns(UserWarning, match='--skip-bad left out 4 items'):
        ds = build('isic', tmp_path, skip_bad=True)
    assert sorted(ds.skipped) == ids[:4]
    assert sum(len(v) for v in ds.class_items) == len(ids) - 4


def test_damage_only_a_decode_sees_is_an_error_naming_the_file(tmp_path):
    facts = ft.write_isic(tmp_path)
    ident = sorted(facts)[0]
    mask = tmp_path / 'ISIC2018' / 'ISIC2018_Task1_Training_GroundTruth' / f'{ident}_segmentation.png'
    corrupt_png_data(mask)
    ds = build('isic', tmp_path)                 # header and tail are intact: construction stays cheap and passes
    with pytest.raises(UserError, match=re.escape(str(mask)) + '.*unreadable or corrupt'):
        ds.read_mask(ident, 0)
    image = ds._paths[ident][0]
    image.write_bytes(b'\xff\xd8 not really a jpeg \xff\xd9')
    with pytest.raises(UserError, match=re.escape(str(image)) + '.*unreadable or corrupt'):
        ds.read_image(ident)
    image.unlink()
    with pytest.raises(UserError, match='does not exist .it was there when the dataset was indexed'):
        ds.read_image(ident)


# --- Chest X-ray --------------------------------------------------------------------------------------------------
def test_lung_pairs_come_from_masks_including_montgomery(targets):
    root, facts = targets
    ds = build('lung', root)
    assert ds.class_names == ['lung']
    assert ds.class_items[0] == sorted(facts['lung']['pairs'])
    assert any(k.startswith('MCUCXR') for k in ds.class_items[0])
    assert not set(facts['lung']['unmasked']) & set(ds.class_items[0])
    assert '2 images without masks' in ds.describe()
    for key in ds.class_items[0]:
        assert_pairing(ds, key, 0)
    report = type(ds).check(root)
    listed = sorted(p.path for p in report.problems if p.kind == 'image_without_mask')
    assert [p.rsplit('/', 1)[1] for p in listed] == [f'{n}.png' for n in facts['lung']['unmasked']]


def test_lung_root_without_space_and_errors(tmp_path):
    facts = ft.write_lung(tmp_path, root='LungSegmentation')
    assert len(build('lung', tmp_path).class_items[0]) == len(facts['pairs'])
    shutil.rmtree(tmp_path / 'LungSegmentation' / 'masks')
    with pytest.raises(UserError, match=r'LungSegmentation/masks does not exist[\s\S]*Expected layout'):
        build('lung', tmp_path)


def test_lung_mask_without_image_is_an_error_or_skipped(tmp_path):
    ft.write_lung(tmp_path)
    (tmp_path / 'Lung Segmentation' / 'CXR_png' / 'MCUCXR_0002_0.png').unlink()
    with pytest.raises(UserError, match=r'masks without images.*MCUCXR_0002_0\.png'):
        build('lung', tmp_path)
    with pytest.warns(UserWarning, match='left out 1 items'):
        ds = build('lung', tmp_path, skip_bad=True)
    assert 'MCUCXR_0002_0' not in ds.class_items[0] and len(ds.class_items[0]) == 5


# --- WBC ----------------------------------------------------------------------------------------------------------
def test_snap_mask_nearest_code():
    raw = np.array([0, 2, 63, 64, 65, 127, 128, 191, 192, 200, 254, 255], np.uint8)
    assert snap_mask(raw).tolist() == [0, 0, 0, 0, 128, 128, 128, 128, 255, 255, 255, 255]
    for value, code in ft.STRAY.items():
        assert snap_mask(np.array([value], np.uint8))[0] == code


def test_wbc_classes_snapping_and_odd_sizes(targets):
    root, facts = targets
    ds = build('wbc', root)
    assert ds.class_names == ['nucleus', 'cytoplasm']
    assert ds.class_items[0] == sorted(facts['wbc']['nucleus'])
    assert ds.class_items[1] == sorted(facts['wbc']['cytoplasm'])
    assert 'ds1/005' not in ds.class_items[1]                      # that cell has no cytoplasm
    for key, raw in facts['wbc']['masks'].items():
        expected = snap_mask(raw)
        assert (ds.read_mask(key, 0) == (expected == 255)).all()
        assert (ds.read_mask(key, 1) == (expected == 128)).all()
        img = np.asarray(ds.read_image(key).convert('L'))
        assert img.shape == raw.shape                               # 12x12, 9x9, 12x11, 10x12, 14x14
    stray = ds.read_mask('ds2/002', 1)[0, :len(ft.STRAY)]
    assert stray.tolist() == [int(code == 128) for code in ft.STRAY.values()]
    episode = ds.sample_episodes(2, 0)[1]
    batch = ds[episode]
    assert batch['query_img'].shape == (3, 32, 32) and batch['support_masks'].shape == (1, 32, 32)


@pytest.mark.parametrize('subset,n', [('1', 5), ('2', 3), ('all', 8)])
def test_wbc_subsets(targets, subset, n):
    root, _ = targets
    ds = build('wbc', root, wbc_subset=subset)
    assert len(ds.class_items[0]) == n and all(k.startswith('ds') for k in ds.class_items[0])


def test_wbc_errors(tmp_path):
    with pytest.raises(UserError, match='--wbc-subset must be 1, 2 or all'):
        build('wbc', tmp_path, wbc_subset='3')
    ft.write_wbc(tmp_path)
    shutil.rmtree(tmp_path / 'WBC' / 'Dataset 2')
    assert len(build('wbc', tmp_path, wbc_subset='1').class_items[0]) == 5
    with pytest.raises(UserError, match='Dataset 2 does not exist'):
        build('wbc', tmp_path)
    mask = tmp_path / 'WBC' / 'Dataset 1' / '003.png'
    Image.open(mask).resize((7, 7)).save(mask)
    with pytest.raises(UserError, match=r'size mismatch.*003\.png: mask is 7x7 but image 003\.bmp is 9x9'):
        build('wbc', tmp_path, wbc_subset='1')
    with pytest.warns(UserWarning, match='left out 1 items'):
        assert 'ds1/003' not in build('wbc', tmp_path, wbc_subset='1', skip_bad=True).class_items[0]


# --- episodes -----------------------------------------------------------------------------------------------------
def test_episodes_are_seeded_balanced_and_worker_independent(targets):
    root, _ = targets
    ds = build('isic', root, nshot=5)
    a, b, c = ds.sample_episodes(30, 3), ds.sample_episodes(30, 3), ds.sample_episodes(30, 4)
    assert a == b and a != c
    assert [e.class_id for e in a] == [i % 3 for i in range(30)]
    for e in a:
        assert e.query not in e.supports and len(e.supports) == 5
        assert e.query in ds.class_items[e.class_id] and set(e.supports) <= set(ds.class_items[e.class_id])
    batches = []
    for workers in (0, 2):
        loader = build_loader(ds, FixedEpisodes(a[:6]), 3, workers)
        batches.append([(x['query_name'], x['query_img'], x['support_masks']) for x in loader])
    for (n0, q0, s0), (n1, q1, s1) in zip(*batches):
        assert n0 == n1 and torch.equal(q0, q1) and torch.equal(s0, s1)


# --- FSS-1000 and Deepglobe ---------------------------------------------------------------------------------------
def test_fss_derived_split_is_520_240_240_and_disjoint():
    names = [f'class{i:04d}' for i in range(1000)]
    split = derived_split(names)
    assert [len(split[s]) for s in ('trn', 'val', 'test')] == [520, 240, 240]
    assert sorted(split['trn'] + split['val'] + split['test']) == names
    assert derived_split(list(reversed(names))) == split
    assert derived_split(names[:10]) == derived_split(names[:10])
    assert [len(v) for v in derived_split(names[:10]).values()] == [2, 2, 6]


def test_fss_splits_episodes_and_pairing(targets):
    root, facts = targets
    names = facts['fss']
    sets = {s: build('fss', root, split=s) for s in ('trn', 'val', 'test')}
    folders = {s: {k.split('/')[0] for items in ds.class_items for k in items} for s, ds in sets.items()}
    assert folders['trn'] | folders['val'] | folders['test'] == set(names)
    assert not (folders['trn'] & folders['val']) and not (folders['val'] & folders['test'])
    ds = sets['test']
    assert ds.domain == 'source' and ds.class_names == [f.replace('_', ' ') for f in sorted(folders['test'])]
    n = sum(len(v) for v in ds.class_items)
    episodes = ds.sample_episodes(n, 0)
    assert sorted(e.query for e in episodes) == sorted(k for v in ds.class_items for k in v)   # every image once
    assert [e.class_id for e in episodes[:4]] == [0, 1, 0, 1]
    for e in episodes:
        assert_pairing(ds, e.query, e.class_id)


def test_fss_is_a_source_side_validation_set_for_train_py(targets):
    from engine.training import _check_source
    root, _ = targets
    _check_source('fss', 'model selection')                       # no error: FSS-1000 is natural images
    val = build('fss', root, split='val')
    assert len(val.sample_episodes(7, 0)) == 7


def test_fss_split_file(tmp_path, targets):
    root, facts = targets
    names = facts['fss']
    (tmp_path / 'fss').mkdir()
    (tmp_path / 'fss' / 'test.txt').write_text('\n'.join(names[:3]) + '\n')
    ds = build('fss', root, split_file=str(tmp_path))                   # HSNet's data/splits folder
    assert ds.class_names == [n.replace('_', ' ') for n in names[:3]]
    (tmp_path / 'test.txt').write_text(f'{names[4]}\nno_such_class\n')
    with pytest.raises(UserError, match=r'no_such_class.*has no folder'):
        build('fss', root, split_file=str(tmp_path))
    with pytest.warns(UserWarning, match='left out'):
        assert build('fss', root, split_file=str(tmp_path), skip_bad=True).usable_classes == [0]
    with pytest.raises(UserError, match='val.txt does not exist'):
        build('fss', root, split='val', split_file=str(tmp_path))


def test_deepglobe_layout_and_rgb_masks(targets, tmp_path):
    root, _ = targets
    ds = build('deepglobe', root)
    assert ds.class_names[:2] == ['agriculture land', 'urban land'] and [len(v) for v in ds.class_items] == [2] * 6
    for c, items in enumerate(ds.class_items):
        assert_pairing(ds, items[0], c)
    with pytest.raises(UserError, match=r'Deepglobe/1/test/origin does not exist[\s\S]*DeepGlobe/1/test/origin'):
        build('deepglobe', tmp_path)


# --- shared checks ------------------------------------------------------------------------------------------------
def test_inspect_file_detects_truncation_empty_and_foreign_files(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    for ext in ('png', 'jpg', 'bmp'):
        path = tmp_path / f'a.{ext}'
        Image.fromarray(rgb).save(path)
        size, _, err = inspect_file(path, full=False)
        assert size == (30, 20) and err is None
        truncate(path, 0.7)
        assert inspect_file(path, full=False)[2] is not None, ext
    (tmp_path / 'empty.png').write_bytes(b'')
    (tmp_path / 'text.png').write_text('hello')
    assert 'empty' in inspect_file(tmp_path / 'empty.png', False)[2]
    assert 'unreadable' in inspect_file(tmp_path / 'text.png', False)[2]
    assert inspect_file(tmp_path / 'none.png', False)[2] == 'file does not exist'
    good = tmp_path / 'm.png'
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(good)
    corrupt_png_data(good)
    assert inspect_file(good, full=False)[2] is None and inspect_file(good, full=True)[2] is not None


def test_report_format_lists_every_check():
    report = DataReport('x', '/data', full=True)
    report.class_names, report.class_items = ['a', 'b'], [['1', '2'], ['3']]
    report.add('unreadable', '/data/2.png', 'truncated', '2')
    report.add('image_without_mask', '/data/9.png', 'no mask', hard=False)
    assert report.counts() == {'a': 1, 'b': 1} and report.bad_keys() == {'2'}
    text = report.format()
    for line in ('images without masks: 1 (warning)', 'masks without images: 0', 'unreadable or corrupt files: 1 '
                 '(1 ERROR)', 'unexpected mask values: 0', 'ERROR /data/2.png: truncated'):
        assert line in text
    assert report.summary(hard=True) == '1 unreadable or corrupt files'


def test_foreign_flags_are_rejected(targets):
    root, _ = targets
    with pytest.raises(UserError, match='--wbc-subset does not apply'):
        build('lung', root, wbc_subset='1')
    with pytest.raises(UserError, match='--isic-classes does not apply'):
        build('wbc', root, isic_classes='x.csv')


# --- end to end: test.py on a tiny checkpoint ---------------------------------------------------------------------
@pytest.mark.parametrize('benchmark', ['isic', 'lung', 'wbc'])
@pytest.mark.parametrize('nshot', [1, 5])
@pytest.mark.slow
def test_test_py_end_to_end(targets, untrained_checkpoint, tmp_path, capsys, benchmark, nshot):
    import test as test_cli
    root, _ = targets
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        extra = ['--wbc-subset', '1'] if benchmark == 'wbc' else []
        results = test_cli.main(['--load', str(untrained_checkpoint), '--benchmark', benchmark, '--datapath', str(root),
                                 '--nshot', str(nshot), '--episodes', '4', '--bsz', '2', '--workers', '0',
                                 '--device', 'cpu', '--logpath', str(tmp_path / 'run'), *extra])
    out = capsys.readouterr().out
    assert METRIC_LINE.search(out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert saved['benchmark'] == benchmark and saved['nshot'] == nshot and saved['protocol'] == '2d'
    assert saved['dataset_options'] == ({'wbc_subset': '1'} if benchmark == 'wbc' else {})
    assert len(saved['episodes']) == 4 and all(len(e['supports']) == nshot for e in saved['episodes'])
    assert 0 <= saved['miou'] <= 100 and saved['miou'] == pytest.approx(results['miou'])
    assert set(saved['per_class']) <= set(build(benchmark, root).class_names)
    if benchmark == 'wbc':
        assert all(e['query'].startswith('ds1/') for e in saved['episodes'])


# --- every layout error path ----------------------------------------------------------------------------------------
def _rm(paths):
    for p in paths:
        p.unlink()


def _isic_dup(root):
    a = next((root / 'ISIC2018' / 'ISIC2018_Task1-2_Training_Input' / '1').glob('*.jpg'))
    shutil.copy(a, root / 'ISIC2018' / 'ISIC2018_Task1-2_Training_Input' / '2' / a.name)


def _fss_class_folder(root):
    return root / 'FSS-1000' / derived_split([f'class_{i:02d}' for i in range(10)])['test'][0]


LAYOUT_ERRORS = {
    'isic no masks': (lambda r: ft.write_isic(r),
                      lambda r: _rm((r / 'ISIC2018' / 'ISIC2018_Task1_Training_GroundTruth').glob('*.png')),
                      'isic', {}, r'no \*_segmentation.png mask in'),
    'isic no images': (lambda r: ft.write_isic(r),
                       lambda r: _rm((r / 'ISIC2018' / 'ISIC2018_Task1-2_Training_Input').glob('*.jpg')),
                       'isic', {}, r'no ISIC_\*.jpg image'),
    'isic image in two class folders': (
        lambda r: ft.write_isic(r, sorted_folders={'melanoma': 1, 'nevus': 2, 'seborrheic_keratosis': 3}), _isic_dup,
        'isic', {}, 'also in class folder 1; ambiguous class'),
    'lung no mask files': (lambda r: ft.write_lung(r), lambda r: _rm((r / 'Lung Segmentation' / 'masks').glob('*')),
                           'lung', {}, r'mask files .*masks/\*.png does not exist'),
    'lung two masks for one image': (
        lambda r: ft.write_lung(r),
        lambda r: shutil.copy(r / 'Lung Segmentation/masks/CHNCXR_0001_1_mask.png',
                              r / 'Lung Segmentation/masks/CHNCXR_0001_1.png'),
        'lung', {}, 'a second mask for CHNCXR_0001_1'),
    'wbc root missing': (lambda r: None, lambda r: None, 'wbc', {}, r'WBC/Dataset 1 does not exist'),
    'wbc no masks': (lambda r: ft.write_wbc(r), lambda r: _rm((r / 'WBC' / 'Dataset 1').glob('*.png')), 'wbc',
                     {'wbc_subset': '1'}, 'mask files'),
    'wbc mask without image': (lambda r: ft.write_wbc(r), lambda r: (r / 'WBC' / 'Dataset 1' / '002.bmp').unlink(),
                               'wbc', {}, r'masks without images.*Dataset 1/002\.png'),
    'fss root missing': (lambda r: None, lambda r: None, 'fss', {}, 'FSS-1000 does not exist'),
    'fss without class folders': (lambda r: (r / 'FSS-1000').mkdir(), lambda r: None, 'fss', {},
                                  'holds no class folder'),
    'fss image without mask': (lambda r: ft.write_fss(r), lambda r: (_fss_class_folder(r) / '2.png').unlink(), 'fss',
                               {}, r'images without masks.*2\.jpg'),
    'fss empty split file': (lambda r: (ft.write_fss(r), (r / 'test.txt').write_text('\n')), lambda r: None, 'fss',
                             {'split_file': 'SPLITDIR'}, 'lists no class'),
    'deepglobe class folder missing': (lambda r: ft.write_deepglobe(r),
                                       lambda r: shutil.rmtree(r / 'Deepglobe' / '4'),
                                       'deepglobe', {}, r'Deepglobe/4/test/origin does not exist'),
    'deepglobe image without mask': (lambda r: ft.write_deepglobe(r),
                                     lambda r: _rm((r / 'Deepglobe' / '3' / 'test' / 'groundtruth').glob('*.png')),
                                     'deepglobe', {}, r'images without masks.*Deepglobe/3/test/origin'),
}


@pytest.mark.parametrize('case', sorted(LAYOUT_ERRORS))
def test_layout_error_paths(tmp_path, case):
    write, mutate, benchmark, options, message = LAYOUT_ERRORS[case]
    write(tmp_path)
    mutate(tmp_path)
    options = {k: (str(tmp_path) if v == 'SPLITDIR' else v) for k, v in options.items()}
    with pytest.raises(UserError, match=message) as err:
        build(benchmark, tmp_path, **options)
    assert 'Traceback' not in str(err.value)

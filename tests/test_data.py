r"""Episodic data: determinism, worker independence, synthetic generation, PASCAL/COCO layouts and their errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from common.config import parse_with_config
from common.errors import UserError
from data import FixedEpisodes, build_dataset, build_loader
from data.coco import COCO
from data.pascal import MIN_PIXELS, PASCAL
from data.synthetic import GENERATOR_VERSION, medical_scene, natural_scene


def test_scene_generation_is_deterministic():
    a = natural_scene(np.random.default_rng([GENERATOR_VERSION, 1, 0, 5]), [3, 7])
    b = natural_scene(np.random.default_rng([GENERATOR_VERSION, 1, 0, 5]), [3, 7])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1])) <= {0, 4, 8} and (a[1] > 0).any()
    for kind, labels in (('skin', {1}), ('cell', {2, 3}), ('chest', {4})):
        img, label = medical_scene(np.random.default_rng(0), kind)
        assert set(np.unique(label)) - {0} == labels
        assert np.array_equal(img[..., 0], img[..., 1])          # grayscale


def test_synthetic_benchmarks(datapath):
    src = build_dataset('synthetic', datapath, 'trn', 1, 64)
    val = build_dataset('synthetic', datapath, 'val', 1, 64)
    med = build_dataset('synthetic-med', datapath, 'test', 1, 64)
    assert len(src.class_names) >= 10 and len(med.class_names) >= 2
    assert src.domain == 'source' and med.domain == 'target'
    trn_items = {k for items in src.class_items for k in items}
    val_items = {k for items in val.class_items for k in items}
    assert trn_items and val_items and not trn_items & val_items
    with pytest.raises(UserError, match='no .test. split'):
        build_dataset('synthetic', datapath, 'test', 1, 64)


def test_episode_content(datapath):
    ds = build_dataset('synthetic-med', datapath, 'test', 5, 48)
    episodes = ds.sample_episodes(12, seed=3)
    assert [e.class_id for e in episodes] == [i % 4 for i in range(12)]              # class-balanced
    for e in episodes:
        assert e.query not in e.supports and len(set(e.supports)) == 5
        assert e.query in ds.class_items[e.class_id] and set(e.supports) <= set(ds.class_items[e.class_id])
    assert ds.sample_episodes(12, seed=3) == episodes and ds.sample_episodes(12, seed=4) != episodes
    item = ds[episodes[0]]
    assert item['query_img'].shape == (3, 48, 48) and item['support_imgs'].shape == (5, 3, 48, 48)
    assert item['query_mask'].dtype == torch.uint8 and set(item['support_masks'].unique().tolist()) <= {0, 1}
    # the image is ImageNet-normalised: undo it and compare with the file resized by PIL
    raw = Image.open(ds.root / 'images' / f'{episodes[0].query}.png').convert('RGB').resize((48, 48), Image.BILINEAR)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    back = (item['query_img'] * std.view(3, 1, 1) + mean.view(3, 1, 1)) * 255
    assert torch.allclose(back, torch.from_numpy(np.array(raw)).permute(2, 0, 1).float(), atol=1e-3)


def test_training_episodes_depend_on_seed_and_epoch_only(datapath):
    ds = build_dataset('synthetic', datapath, 'trn', 1, 64)
    a = ds.sample_training_episodes(30, seed=0, epoch=2)
    assert a == ds.sample_training_episodes(30, seed=0, epoch=2)
    assert a != ds.sample_training_episodes(30, seed=0, epoch=3)
    assert len({(e.query, e.class_id) for e in a}) == 30                 # one epoch = distinct (image, class) pairs


def test_episodes_identical_across_worker_counts(datapath):
    ds = build_dataset('synthetic', datapath, 'val', 2, 48)
    episodes = ds.sample_episodes(10, seed=0)
    batches = {}
    for workers in (0, 2):
        loader = build_loader(ds, FixedEpisodes(episodes), bsz=3, workers=workers)
        batches[workers] = list(loader)
    for b0, b2 in zip(batches[0], batches[2], strict=True):
        assert b0['query_name'] == b2['query_name'] and b0['support_names'] == b2['support_names']
        for key in ('query_img', 'query_mask', 'support_imgs', 'support_masks', 'class_id'):
            assert torch.equal(b0[key], b2[key])


# --- PASCAL in the HSNet layout -----------------------------------------------------------------------------------
def _write_voc(root, labels: dict[str, np.ndarray], val: list[str]):
    voc = root / 'VOC2012'
    (voc / 'JPEGImages').mkdir(parents=True)
    (voc / 'SegmentationClassAug').mkdir()
    (voc / 'ImageSets' / 'Segmentation').mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, label in labels.items():
        pixels = rng.integers(0, 255, (*label.shape, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / 'JPEGImages' / f'{name}.jpg')
        Image.fromarray(label).save(voc / 'SegmentationClassAug' / f'{name}.png')
    (voc / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('\n'.join(val) + '\n')


def _label(classes_pixels, width=64):
    label = np.zeros((96, width), np.uint8)
    row = 0
    for cls, pixels in classes_pixels:
        rows = pixels // width
        label[row:row + rows] = cls
        row += rows
    label[-2:, :] = 255                                         # boundary lines of void pixels
    return label


@pytest.fixture
def voc(tmp_path):
    big, small = MIN_PIXELS, MIN_PIXELS - 64
    labels = {
        '2008_000001': _label([(1, big), (2, small)]),          # aeroplane kept, bicycle too small
        '2008_000002': _label([(1, big)]),
        '2008_000003': _label([(1, big), (7, big)]),            # aeroplane + car
        '2008_000004': _label([(7, big)]),
        '2008_000005': _label([(7, big), (15, big)]),
        '2008_000006': _label([(15, big)]),
        '2007_000010': _label([(1, big)]),                      # val
        '2007_000011': _label([(1, big), (15, big)]),           # val
    }
    _write_voc(tmp_path, labels, val=['2007_000010', '2007_000011'])
    return tmp_path


def test_pascal_derived_lists_and_folds(voc):
    trn = PASCAL(voc, 'trn', fold='all', img_size=32)
    names = dict(zip(trn.class_names, trn.class_items))
    assert names['aeroplane'] == ['2008_000001', '2008_000002', '2008_000003']
    assert names['bicycle'] == []                               # under the 2*32*32 pixel rule
    assert names['car'] == ['2008_000003', '2008_000004', '2008_000005']
    assert names['person'] == ['2008_000005', '2008_000006']
    assert len(trn.pairs) == 8
    cache = list((voc / 'VOC2012' / '.cdtg_cache').glob('pascal_lists*trn*.json'))
    assert len(cache) == 1
    val = PASCAL(voc, 'val', fold='all', img_size=32)
    assert dict(zip(val.class_names, val.class_items))['aeroplane'] == ['2007_000010', '2007_000011']
    # fold 0 holds out classes 0-4: trn keeps car/person, val keeps aeroplane only
    f0_trn, f0_val = PASCAL(voc, 'trn', fold='0'), PASCAL(voc, 'val', fold=0)
    assert [f0_trn.class_names[c] for c in f0_trn.usable_classes] == ['car', 'person']
    assert [f0_val.class_names[c] for c in f0_val.usable_classes] == ['aeroplane']
    assert PASCAL(voc, 'trn', fold='4').fold == 'all'
    with pytest.raises(UserError, match='--fold'):
        PASCAL(voc, 'trn', fold='7')


def test_pascal_masks_keep_ignore_in_query_only(voc):
    ds = PASCAL(voc, 'trn', fold='all', nshot=1, img_size=64)
    from data import Episode
    item = ds[Episode(0, '2008_000003', ('2008_000001',))]
    assert (item['query_mask'][-1] == 255).all()                # void pixels kept for the metric
    assert set(item['support_masks'].unique().tolist()) == {0, 1}
    # 32 of 96 label rows are aeroplane; nearest resizing to 64 rows keeps a third of them
    assert int((item['query_mask'] == 1).sum()) == pytest.approx(64 * 64 / 3, abs=64)


def test_pascal_split_file(voc, tmp_path):
    split = tmp_path / 'splits'
    for sub in ('trn', 'val'):
        (split / sub).mkdir(parents=True)
        for f in range(4):
            (split / sub / f'fold{f}.txt').write_text('')
    (split / 'trn' / 'fold1.txt').write_text('2008_000004__7\n2008_000005__7\n2008_000001__2\n')
    ds = PASCAL(voc, 'trn', fold='all', split_file=str(split))
    assert dict(zip(ds.class_names, ds.class_items))['car'] == ['2008_000004', '2008_000005']
    (split / 'trn' / 'fold2.txt').write_text('2008_000004-7\n')
    with pytest.raises(UserError, match='fold2.txt:1'):
        PASCAL(voc, 'trn', fold='all', split_file=str(split))
    with pytest.raises(UserError, match='missing'):
        PASCAL(voc, 'trn', fold='all', split_file=str(tmp_path / 'nowhere'))


def test_pascal_layout_errors(tmp_path, voc):
    with pytest.raises(UserError, match='VOC2012/JPEGImages') as err:
        PASCAL(tmp_path / 'nonexistent', 'trn')
    assert 'SegmentationClassAug' in str(err.value)
    (voc / 'VOC2012' / 'ImageSets' / 'Segmentation' / 'val.txt').unlink()
    with pytest.raises(UserError, match='val.txt'):
        PASCAL(voc, 'val', fold='all')


def test_corrupt_files_name_the_file(voc):
    ds = PASCAL(voc, 'trn', fold='all', img_size=32)
    (voc / 'VOC2012' / 'JPEGImages' / '2008_000002.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(UserError, match='2008_000002.jpg'):
        ds.load_pair('2008_000002', 0)
    (voc / 'VOC2012' / 'SegmentationClassAug' / '2008_000004.png').unlink()
    with pytest.raises(UserError, match='2008_000004.png'):
        ds.load_pair('2008_000004', 6)


def test_coco_layout_and_folds(tmp_path):
    base = tmp_path / 'COCO2014'
    rng = np.random.default_rng(0)
    layout = (('train2014', {1: [0, 4], 2: [0], 3: [4], 4: [1, 5], 5: [1]}), ('val2014', {9: [0], 10: [0]}))
    for subset, specs in layout:
        (base / subset).mkdir(parents=True)
        (base / 'annotations' / subset).mkdir(parents=True)
        for i, classes in specs.items():
            name = f'COCO_{subset}_{i:012d}'
            label = np.zeros((64, 64), np.uint8)
            for j, c in enumerate(classes):
                label[j * 32:(j + 1) * 32] = c + 1
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(base / subset / f'{name}.jpg')
            Image.fromarray(label).save(base / 'annotations' / subset / f'{name}.png')
    trn = COCO(tmp_path, 'trn', fold='all', img_size=32)
    items = dict(zip(trn.class_names, trn.class_items))
    assert items['person'] == ['train2014/COCO_train2014_000000000001', 'train2014/COCO_train2014_000000000002']
    assert items['airplane'] == ['train2014/COCO_train2014_000000000001', 'train2014/COCO_train2014_000000000003']
    # fold 0 holds out classes 0, 4, 8, ...: training keeps only bicycle (class 1)
    f0 = COCO(tmp_path, 'trn', fold=0)
    assert [f0.class_names[c] for c in f0.usable_classes] == ['bicycle']
    img, mask = trn.load_pair('train2014/COCO_train2014_000000000001', 4)
    assert img.shape == (3, 32, 32) and int(mask.sum()) == 16 * 32
    with pytest.raises(UserError, match='COCO2014/val2014'):
        COCO(tmp_path / 'empty', 'val')


def test_foreign_dataset_option_is_an_error(datapath):
    with pytest.raises(UserError, match='--fold does not apply'):
        build_dataset('synthetic', datapath, 'trn', 1, 64, fold='1')
    with pytest.raises(UserError, match='unknown benchmark'):
        build_dataset('nope', datapath, 'trn', 1, 64)


def test_yaml_config_defaults(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument('--config')
    p.add_argument('--img-size', type=int, default=400)
    p.add_argument('--lr', type=float, default=1e-3)
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('img-size: 96\nlr: 0.01\n')
    args = parse_with_config(p, ['--config', str(cfg), '--lr', '0.5'])
    assert args.img_size == 96 and args.lr == 0.5                 # file sets defaults, flags win
    cfg.write_text('img_sise: 96\n')
    with pytest.raises(UserError, match="unknown key 'img_sise'"):
        parse_with_config(p, ['--config', str(cfg)])
    with pytest.raises(UserError, match='does not exist'):
        parse_with_config(p, ['--config', str(tmp_path / 'none.yaml')])


def test_the_image_cache_is_shared_by_the_loader_workers_and_decodes_each_pair_once(datapath, monkeypatch):
    r"""`cache_size` > 0 (test.py --cache-images): two worker processes, two passes over the same episodes, and every
    distinct (image, class) pair of the episode list is decoded exactly once in total; the batches equal the uncached
    loader's. Without a cache every episode decodes its images again."""
    import multiprocessing

    from data import FixedEpisodes, build_dataset, build_loader
    ds = build_dataset('synthetic-med', datapath, 'test', 2, 32)
    episodes = ds.sample_episodes(12, 0)
    pairs = {pair for e in episodes for pair in e.pairs()}
    reads = multiprocessing.get_context().Value('i', 0)
    real = type(ds).read_image

    def counted(self, key):
        with reads.get_lock():
            reads.value += 1
        return real(self, key)
    monkeypatch.setattr(type(ds), 'read_image', counted)            # inherited by the forked workers
    plain = [b for b in build_loader(ds, FixedEpisodes(episodes), 3, 0)]
    assert reads.value == 3 * len(episodes)                          # query + 2 supports, every episode
    reads.value = 0
    ds.cache_size = len(pairs) + 5
    loader = build_loader(ds, FixedEpisodes(episodes), 3, 2)
    for _ in range(2):
        for batch, ref in zip(loader, plain):
            assert torch.equal(batch['query_img'], ref['query_img'])
            assert torch.equal(batch['support_masks'], ref['support_masks'])
    assert reads.value == len(pairs) < 3 * len(episodes) and ds.pair_cache.decoded == len(pairs)
    assert sorted(ds.pair_cache.slots) == sorted(pairs)
    ds.cache_size = 2                                                # a small cache: the first 2 pairs only
    reads.value = 0
    small = build_loader(ds, FixedEpisodes(episodes), 3, 0)
    for _ in range(2):
        list(small)
    assert ds.pair_cache.decoded == 2 and reads.value == 2 + 2 * (3 * len(episodes) - sum(
        pair in ds.pair_cache.slots for e in episodes for pair in e.pairs()))

r"""PASCAL VOC 2012 + SBD (PASCAL-5i) in the HSNet layout, with folds 0-3 and an all-20-classes mode.

Image lists. Either HSNet's split files (`--split-file DIR` with `{trn,val}/fold{0..3}.txt`, lines `<id>__<CC>`,
CC 1-based) for exact comparability, or lists derived from the masks by this deterministic rule:
  * val images = `VOC2012/ImageSets/Segmentation/val.txt`; trn images = every other mask in SegmentationClassAug;
  * an (image, class) pair is kept when the class covers at least 2*32*32 = 2048 pixels of the mask (PFENet's
    filter; it drops pairs whose object is mostly a few boundary pixels).
The derived lists are cached (next to the data when writable) keyed by the rule. Masks: foreground = class + 1,
255 = ignore (kept in query masks so the metric skips those pixels; 0 in support masks).
"""
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import UserError
from data.episodic import (EpisodicDataset, cache_file, open_image, open_label, read_json, require_dirs,
                           write_json_atomic)

CLASSES = ['aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'diningtable',
           'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor']
MIN_PIXELS = 2 * 32 * 32
LIST_VERSION = 1


def parse_fold(fold, nfolds: int = 4):
    r"""'0'..'3' -> int; None, 'all' or '4' (PATNet's name for it) -> 'all'."""
    if fold is None or str(fold).lower() in ('all', str(nfolds)):
        return 'all'
    try:
        f = int(fold)
    except ValueError:
        f = -1
    if not 0 <= f < nfolds:
        raise UserError(f'--fold must be 0-{nfolds - 1} or "all" (got {fold!r})')
    return f


def scan_masks(mask_dir: Path, names: list[str], nclass: int, desc: str) -> dict[str, list[int]]:
    r"""name -> pixel count of each class 1..nclass (one pass over the masks). Label maps with values other than
    0..nclass and 255 (colour PNGs, wrong dataset) are an error naming them."""
    counts, bad = {}, []
    for name in tqdm(names, desc=desc, leave=False, mininterval=2):
        path = mask_dir / f'{name}.png'
        hist = np.bincount(open_label(path).ravel(), minlength=256)
        stray = np.flatnonzero(hist[nclass + 1:255]) + nclass + 1
        if stray.size:
            bad.append(f'{path}: values {", ".join(map(str, stray[:5].tolist()))}{" ..." if stray.size > 5 else ""}')
        counts[name] = hist[1:nclass + 1].tolist()
    if bad:
        raise label_error(bad, nclass)
    return counts


def label_error(bad: list[str], nclass: int) -> UserError:
    return UserError(f'{len(bad)} label map(s) hold values outside 0-{nclass} and 255 (class indices; 255 = '
                     'ignore), e.g.\n  ' + '\n  '.join(bad[:5]) + '\nThese must be index masks (PASCAL: '
                     'SegmentationClassAug; COCO: HSNet\'s class-index PNGs), not colour images; run '
                     'scripts/check_data.py for the full list')


def class_mask(path: Path, class_id: int, nclass: int) -> np.ndarray:
    r"""A label map as the binary mask of one class (1), other pixels 0, 255 kept as ignore; values outside 0..nclass
    and 255 are an error naming the file."""
    label = open_label(path)
    if label.max() > nclass and (label[label != 255] > nclass).any():
        stray = sorted(set(np.unique(label[(label > nclass) & (label != 255)]).tolist()))
        raise label_error([f'{path}: values {", ".join(map(str, stray[:5]))}'], nclass)
    mask = (label == class_id + 1).astype(np.uint8)
    mask[label == 255] = 255
    return mask


class FoldedDataset(EpisodicDataset):
    r"""A source benchmark split into `nfolds` class folds (PASCAL-5i, COCO-20i): fold f holds out
    `held_out(f)` for validation and trains on the other classes; fold 'all' uses every class for both. Its
    (image, class) pairs come from HSNet's split files (`--split-file`, `_split_file_pairs`) or are derived from the
    masks (`_derived_pairs`); subclasses name the folders that must exist (`required_dirs`)."""
    domain = 'source'
    splits = ('trn', 'val')
    options = {'fold': '0-3 (the four class folds: 5 classes each in PASCAL, 20 in COCO) or "all" (every class; '
                       'default)',
               'split_file': "folder with HSNet's split files ({trn,val}/fold{0..3}.txt or .pkl) to use instead of "
                             'the lists derived from the masks'}
    classes: list[str] = []
    nfolds = 4

    def __init__(self, datapath, split='trn', nshot=1, img_size=400, fold=None, split_file=None):
        self.fold = parse_fold(fold, self.nfolds)
        self.split_file = Path(split_file) if split_file else None
        super().__init__(datapath, split=split, nshot=nshot, img_size=img_size)

    def held_out(self, fold: int) -> list[int]:
        raise NotImplementedError

    def required_dirs(self) -> list[Path]:
        raise NotImplementedError

    def fold_classes(self) -> list[int]:
        n = len(self.classes)
        if self.fold == 'all':
            return list(range(n))
        held_out = self.held_out(self.fold)
        return held_out if self.split == 'val' else [c for c in range(n) if c not in held_out]

    def build_index(self):
        require_dirs(self, *self.required_dirs())
        pairs = self._split_file_pairs() if self.split_file else self._derived_pairs()
        keep = set(self.fold_classes())
        items: list[list[str]] = [[] for _ in self.classes]
        for name, c in pairs:
            if c in keep:
                items[c].append(name)
        return list(self.classes), items


class PASCAL(FoldedDataset):
    r"""PASCAL-5i. Fold f tests classes 5f..5f+4 and trains on the others; fold 'all' uses all 20 for both."""
    name = 'pascal'
    classes = CLASSES
    layout = ('  VOC2012/JPEGImages/2007_000032.jpg ...\n'
              '  VOC2012/SegmentationClassAug/2007_000032.png ...   (SBD-augmented masks, 255 = ignore)\n'
              '  VOC2012/ImageSets/Segmentation/val.txt            (from the VOC2012 tar; or pass --split-file)')

    @property
    def root(self) -> Path:
        return self.datapath / 'VOC2012'

    def held_out(self, fold: int) -> list[int]:
        n = len(CLASSES)
        return list(range(fold * n // self.nfolds, (fold + 1) * n // self.nfolds))

    def required_dirs(self) -> list[Path]:
        return [self.root / 'JPEGImages', self.root / 'SegmentationClassAug']

    def _split_file_pairs(self) -> list[tuple[str, int]]:
        folds = range(self.nfolds) if self.fold == 'all' or self.split == 'trn' else [self.fold]
        pairs = []
        for f in folds:
            path = self.split_file / self.split / f'fold{f}.txt'
            if not path.is_file():
                raise UserError(f'--split-file {self.split_file}: {path} is missing (expected HSNet split files '
                                f'{{trn,val}}/fold{{0..3}}.txt with lines "<image id>__<class 1-20>")')
            for line_no, line in enumerate(path.read_text().splitlines(), 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    name, cls = line.rsplit('__', 1)
                    c = int(cls) - 1
                    assert 0 <= c < len(CLASSES)
                except (ValueError, AssertionError):
                    raise UserError(f'{path}:{line_no}: expected "<image id>__<class 1-20>", got {line!r}') from None
                pairs.append((name, c))
        return pairs

    def _derived_pairs(self) -> list[tuple[str, int]]:
        val_list = self.root / 'ImageSets' / 'Segmentation' / 'val.txt'
        if not val_list.is_file():
            raise UserError(f'pascal: {val_list} is missing. It ships with VOCtrainval_11-May-2012.tar and defines '
                            'the val images; alternatively pass --split-file with HSNet split files.\n'
                            f'Expected layout under --datapath {self.datapath}:\n{self.layout}')
        cache = cache_file(self, self.root, f'pascal_lists_v{LIST_VERSION}_{self.split}_min{MIN_PIXELS}.json')
        if cache.is_file():
            return [(n, c) for n, c in read_json(cache)]
        val = {line.strip() for line in val_list.read_text().splitlines() if line.strip()}
        masks = sorted(p.stem for p in (self.root / 'SegmentationClassAug').glob('*.png'))
        names = [n for n in masks if (n in val) == (self.split == 'val')]
        if not names:
            raise UserError(f'pascal: no {self.split} masks found in {self.root / "SegmentationClassAug"}')
        counts = scan_masks(self.root / 'SegmentationClassAug', names, len(CLASSES), f'indexing pascal/{self.split}')
        pairs = [(n, c) for n in names for c, px in enumerate(counts[n]) if px >= MIN_PIXELS]
        write_json_atomic(cache, pairs)
        return pairs

    def read_image(self, key):
        return open_image(self.root / 'JPEGImages' / f'{key}.jpg')

    def read_mask(self, key, class_id):
        return class_mask(self.root / 'SegmentationClassAug' / f'{key}.png', class_id, len(CLASSES))

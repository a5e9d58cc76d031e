r"""Chest X-ray lungs (Montgomery + Shenzhen, Kaggle "chest-xray-masks-and-labels"): one class, 704 masked images.

Pairs come from `masks/`, never from the image folder: a mask `CHNCXR_0001_0_mask.png` (Shenzhen) or
`MCUCXR_0001_0.png` (Montgomery, same name as its image) belongs to `CXR_png/<name without a trailing _mask>.png`.
PATNet instead drops the last 9 characters of every mask name, which breaks every Montgomery mask. Images without a
mask (96 Shenzhen images on the real data) are listed by the checker and not used. Masks are 0/255, binarised at
>= 128; the grayscale radiographs are replicated to RGB.

`--lung-subset shenzhen|montgomery|all` (default all: 566 + 138 = 704 pairs) chooses the population. The released
PATNet / CD-TG loaders (`name[:-9]`) can only pair the Shenzhen masks (`*_mask.png`): every episode that drew a
Montgomery mask would crash, so published Chest X-ray numbers were very likely computed on the 566 Shenzhen pairs;
`--lung-subset shenzhen` reproduces that population.
"""
from pathlib import Path

from common.errors import UserError
from data.checks import (CheckedDataset, DataReport, check_pair, find_dataset_root, layout_error,
                         list_files)

CLASSES = ['lung']
ROOTS = ('LungSegmentation', 'Lung Segmentation')
IMG_DIR, MASK_DIR = 'CXR_png', 'masks'
# Name prefix of each source: Shenzhen (CHNCXR_*, masks *_mask.png), Montgomery (MCUCXR_*, masks named as the image).
SUBSETS = {'shenzhen': 'CHNCXR_', 'montgomery': 'MCUCXR_'}


def image_stem(mask_stem: str) -> str:
    r"""'CHNCXR_0001_0_mask' -> 'CHNCXR_0001_0'; 'MCUCXR_0001_0' -> 'MCUCXR_0001_0'."""
    return mask_stem[:-len('_mask')] if mask_stem.endswith('_mask') else mask_stem


class Lung(CheckedDataset):
    r"""Chest X-ray lung segmentation: the 704 (radiograph, both-lungs mask) pairs listed by `masks/`."""
    name = 'lung'
    domain = 'target'
    splits = ('test',)
    options = {'lung_subset': 'shenzhen (566 pairs; what the released PATNet/CD-TG loaders can read), montgomery '
                              '(138) or all (704; default)'}
    layout = ('  LungSegmentation/   (or "Lung Segmentation/" as Kaggle ships it, or --datapath pointing at it)\n'
              '    CXR_png/CHNCXR_0001_0.png ... MCUCXR_0001_0.png ...   (800 radiographs)\n'
              '    masks/CHNCXR_0001_0_mask.png ... MCUCXR_0001_0.png ...  (704 masks, 0/255)')

    def configure(self, lung_subset: str | None = None) -> None:
        self.subset = (lung_subset or 'all').strip().lower()
        if self.subset not in (*SUBSETS, 'all'):
            raise UserError(f'--lung-subset must be shenzhen, montgomery or all (got {lung_subset!r})')

    def conventions(self) -> dict:
        return {'lung_subset': self.subset}

    def find_root(self) -> Path:
        return find_dataset_root(self, ROOTS, (IMG_DIR, MASK_DIR))

    def scan(self, full: bool) -> DataReport:
        root = self.find_root()
        report = DataReport(self.name, root, full)
        img_dir, mask_dir = root / IMG_DIR, root / MASK_DIR
        images = {p.stem: p for p in list_files(img_dir, ('.png',))}
        mask_files = list_files(mask_dir, ('.png',))
        if not mask_files:
            raise layout_error(self, mask_dir / '*.png', what='mask files')
        self._paths: dict[str, tuple[Path, Path]] = {}
        items = []
        for mask in mask_files:
            key = image_stem(mask.stem)
            if key in self._paths:
                report.add('other', mask, f'a second mask for {key}.png (the other is {self._paths[key][1].name})',
                           key)
                continue
            image = images.get(key)
            if image is None:
                report.add('mask_without_image', mask, f'image {img_dir / (key + ".png")} does not exist', key)
                continue
            check_pair(report, key, image, mask, full, allowed=(0, 255))
            self._paths[key] = (image, mask)
            items.append(key)
        unmasked = sorted(set(images) - {image_stem(m.stem) for m in mask_files})
        for key in unmasked:
            report.add('image_without_mask', images[key], 'no mask in masks/; not used', hard=False)
        counts = {name: sum(k.startswith(prefix) for k in items) for name, prefix in SUBSETS.items()}
        report.notes.append(', '.join(f'{name}: {n} pairs' for name, n in counts.items()))
        if self.subset != 'all':
            items = [k for k in items if k.startswith(SUBSETS[self.subset])]
            report.notes.append(f'--lung-subset {self.subset}: {len(items)} pairs used')
        report.class_names, report.class_items = list(CLASSES), [items]
        return report

    def describe(self) -> str:
        return f'{super().describe()} (--lung-subset {self.subset})'


r"""Deepglobe land cover in PATNet's preprocessed layout: six classes, one binary mask per (tile, class).

PATNet's `data/preprocess.py` cuts each 2448x2448 image into 6x6 tiles, keeps tiles whose rarest colour exceeds
4.8%, and writes per class `Deepglobe/<1..6>/test/origin/<tile>.jpg` with a binary mask
`Deepglobe/<1..6>/test/groundtruth/<tile>.png`. The folder numbers follow that script's colour list read by OpenCV
in BGR order: 1 agriculture land, 2 urban land, 3 rangeland, 4 forest land, 5 water, 6 barren land ("unknown" is
dropped). Masks are binarised at >= 128. 600 class-balanced episodes (episode i takes class i % 6).
"""
from pathlib import Path


from data.checks import (CheckedDataset, DataReport, find_dataset_root, layout_error, list_files,
                         pair_by_stem)

CLASSES = ['agriculture land', 'urban land', 'rangeland', 'forest land', 'water', 'barren land']
ROOTS = ('Deepglobe', 'DeepGlobe', 'deepglobe')


class Deepglobe(CheckedDataset):
    r"""Deepglobe satellite tiles (PATNet preprocessing), six land-cover classes."""
    name = 'deepglobe'
    domain = 'target'
    splits = ('test',)
    layout = ('  Deepglobe/\n'
              '    1/test/origin/<tile>.jpg ...  1/test/groundtruth/<tile>.png ...   (binary masks)\n'
              '    ... 2/ to 6/ alike   (1 agriculture, 2 urban, 3 rangeland, 4 forest, 5 water, 6 barren)')

    def find_root(self) -> Path:
        return find_dataset_root(self, ROOTS, ('1/test/origin',))

    def scan(self, full: bool) -> DataReport:
        root = self.find_root()
        report = DataReport(self.name, root, full)
        self._paths: dict[str, tuple[Path, Path]] = {}
        items: list[list[str]] = []
        for c in range(len(CLASSES)):
            origin, gt = root / str(c + 1) / 'test' / 'origin', root / str(c + 1) / 'test' / 'groundtruth'
            for folder in (origin, gt):
                if not folder.is_dir():
                    raise layout_error(self, folder)
            images = {p.stem: p for p in list_files(origin, ('.jpg', '.jpeg', '.png'))}
            masks = {p.stem: p for p in list_files(gt, ('.png',))}
            pairs = pair_by_stem(report, images, masks, gt, f'{c + 1}/', full)
            self._paths.update((key, (image, mask)) for key, image, mask in pairs)
            items.append([key for key, _, _ in pairs])
        report.class_names, report.class_items = list(CLASSES), items
        return report


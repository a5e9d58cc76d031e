r"""FSS-1000: 1,000 natural-object classes of 10 images each; PATNet's source-side validation set.

Layout `FSS-1000/<class>/<n>.jpg` with a 0/255 mask `<n>.png`. Class splits (train / val / test = 520 / 240 / 240
classes in HSNet):
  * `--split-file DIR` with HSNet's `{trn,val,test}.txt` (one class folder per line; HSNet's `data/splits` folder,
    whose `fss/` subfolder holds them, is accepted too). They are not redistributed here;
  * otherwise a deterministic split derived from the class folder names alone: classes are ordered by the SHA-1 of
    their folder name, the first 24% (rounded) are `val`, the next 24% `test`, the rest `trn` (520/240/240 for
    1,000 classes). It does not depend on NumPy, the platform or the seed, but it is not HSNet's split: report
    which one you used.
Episodes (`sample_episodes`): episode i takes class i % C and that class's next image in a seeded order, so the
first C*10 episodes use every image once as the query (HSNet's protocol: `--episodes 2400` for the 240 test
classes) and any shorter list stays class-balanced. Supports are other images of the same class.
"""
import hashlib
from pathlib import Path

import numpy as np

from common.errors import UserError
from data.checks import (CheckedDataset, DataReport, layout_error, list_files, pair_by_stem)
from data.episodic import Episode

ROOTS = ('FSS-1000', 'fewshot_data', 'fewshot_data/fewshot_data')
SPLIT_SHARE = {'val': 0.24, 'test': 0.24}


def derived_split(classes: list[str]) -> dict[str, list[str]]:
    r"""trn/val/test class lists from the folder names alone (see the module docstring)."""
    order = sorted(classes, key=lambda c: (hashlib.sha1(c.encode('utf-8')).hexdigest(), c))
    n = len(order)
    n_val = n_test = int(round(SPLIT_SHARE['val'] * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    return {'val': sorted(order[:n_val]), 'test': sorted(order[n_val:n_val + n_test]),
            'trn': sorted(order[n_val + n_test:])}


def display_name(folder: str) -> str:
    r"""'african_crocodile' -> 'african crocodile' (class names are matched to text by name)."""
    return folder.replace('_', ' ').strip().lower()


class FSS1000(CheckedDataset):
    r"""FSS-1000 with HSNet's split files or a documented derived class split."""
    name = 'fss'
    domain = 'source'
    splits = ('trn', 'val', 'test')
    options = {'split_file': "folder with HSNet's {trn,val,test}.txt class lists (default: a derived 520/240/240 "
                             'class split)'}
    layout = ('  FSS-1000/   (or fewshot_data/ as the original archive unpacks)\n'
              '    abacus/1.jpg + 1.png ... 10.jpg + 10.png   (masks 0/255)\n'
              '    ... one folder per class (1,000)')

    def configure(self, split_file: str | None = None) -> None:
        self.split_file = Path(split_file).expanduser() if split_file else None

    def find_root(self) -> tuple[Path, list[str]]:
        r"""The first candidate root that holds class folders, and those folders."""
        candidates = [self.datapath / r for r in ROOTS]
        for root in candidates:
            if root.is_dir():
                folders = self.class_folders(root)
                if folders:
                    return root, folders
        existing = next((r for r in candidates if r.is_dir()), None)
        if existing is None:
            raise layout_error(self, candidates[0], also=', '.join(r + '/' for r in ROOTS[1:]))
        raise UserError(f'fss: {existing} holds no class folder with images (<class>/1.jpg + 1.png ...).\n'
                        f'Expected layout under --datapath {self.datapath}:\n{self.layout}')

    def class_folders(self, root: Path) -> list[str]:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')
                      and any(q.suffix.lower() == '.jpg' for q in p.iterdir()))

    def split_classes(self, root: Path, present: list[str], report: DataReport) -> list[str]:
        if self.split_file is None:
            report.notes.append('classes: the derived split (SHA-1 order of the folder names; pass --split-file for '
                                "HSNet's lists)")
            return derived_split(present)[self.split]
        candidates = [self.split_file / f'{self.split}.txt', self.split_file / 'fss' / f'{self.split}.txt']
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise UserError(f'fss: --split-file {self.split_file}: {candidates[0]} does not exist (expected HSNet\'s '
                            'split files trn.txt, val.txt, test.txt with one class folder name per line)')
        names = [line.strip() for line in path.read_text(encoding='utf-8-sig').splitlines() if line.strip()]
        if not names:
            raise UserError(f'fss: {path} lists no class')
        report.notes.append(f'classes from {path}')
        return sorted(set(names))

    def scan(self, full: bool) -> DataReport:
        root, present = self.find_root()
        report = DataReport(self.name, root, full)
        self._paths: dict[str, tuple[Path, Path]] = {}
        self._folders = self.split_classes(root, present, report)
        items: list[list[str]] = []
        for folder in self._folders:
            keys: list[str] = []
            items.append(keys)
            if not (root / folder).is_dir():
                report.add('missing', root / folder, f'class {folder!r} of the {self.split} split has no folder',
                           f'class:{folder}')
                continue
            images = {p.stem: p for p in list_files(root / folder, ('.jpg',))}
            masks = {p.stem: p for p in list_files(root / folder, ('.png',))}
            for key, image, mask in pair_by_stem(report, images, masks, root / folder, f'{folder}/', full):
                self._paths[key] = (image, mask)
                keys.append(key)
        report.class_names = [display_name(f) for f in self._folders]
        report.class_items = items
        return report

    def sample_episodes(self, n: int, seed: int) -> list[Episode]:
        r"""Episode i: class i % C, its (i // C)-th image in a seeded order as the query (every image once when
        n = number of images of the split); supports: other images of the class."""
        rng = np.random.default_rng(seed)
        orders = {c: [self.class_items[c][j] for j in rng.permutation(len(self.class_items[c]))]
                  for c in self.usable_classes}
        episodes, taken = [], {c: 0 for c in self.usable_classes}
        for i in range(n):
            c = self.usable_classes[i % len(self.usable_classes)]
            query = orders[c][taken[c] % len(orders[c])]
            taken[c] += 1
            episodes.append(Episode(c, query, self.sample_supports(rng, c, query)))
        return episodes


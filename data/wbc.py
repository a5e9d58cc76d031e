r"""WBC (zxaoyou/segmentation_WBC): white blood cells, classes nucleus and cytoplasm, Dataset 1 and/or Dataset 2.

Each `NNN.bmp` has a gray mask `NNN.png` of the same size: 0 background (red cells included), 128 cytoplasm, 255
nucleus. Every mask pixel is first snapped to the nearest of {0, 128, 255} (Dataset 2 has stray low values in five
masks; ties go to the lower code). `--wbc-subset 1|2|all` (default all, pooled) chooses the datasets; say which one
you report. Image sizes vary (Dataset 1: 120x120 and 29 other sizes; Dataset 2: 300x300).

Two protocols (`--wbc-protocol`):
  * `ours` (default): nucleus = 255 and cytoplasm = 128 (the ring around the nucleus, not the whole cell); an image
    belongs to a class when its snapped mask contains that class; 600 class-balanced episodes (`i % 2`) at
    --img-size, the §2 metric.
  * `cdtg`: the CD-TG release's loader (Lilacis/CD_TG dataloader/wbc.py). It reads one folder per class with
    `<name>_mask.png` masks (the repository ships no script that builds them), binarises every mask at >= 128,
    resizes to 321x321 and uses every image of a class once as the query (supports drawn at random). Applied to
    the raw 0/128/255 masks, ">= 128" makes its cytoplasm the whole cell (cytoplasm + nucleus); its nucleus
    folder must have held re-encoded nucleus masks (otherwise both classes would be the same). So here:
    cytoplasm = raw mask >= 128, nucleus = snapped 255, 321x321 whatever --img-size says, and the episode list
    is every (image, class) pair once, class by class (`--episodes` must be left out or equal that count).
"""
from pathlib import Path

import numpy as np

from common.errors import UserError
from data.episodic import Episode
from data.checks import CheckedDataset, DataReport, check_pair, first_existing, layout_error, list_files, \
    note_values, open_mask

CLASSES = ['nucleus', 'cytoplasm']
CODES = {'nucleus': 255, 'cytoplasm': 128}
LEVELS = np.array([0, 128, 255])
ROOTS = ('WBC', 'segmentation_WBC', 'segmentation_WBC-master')
SUBSET_DIRS = {'1': ('Dataset 1', 'Dataset1', 'Dataset_1'), '2': ('Dataset 2', 'Dataset2', 'Dataset_2')}
# value -> nearest of {0, 128, 255}; argmin takes the first (lower) level on a tie (64 -> 0).
SNAP = LEVELS[np.abs(np.arange(256)[:, None] - LEVELS[None, :]).argmin(axis=1)].astype(np.uint8)
PROTOCOLS = ('ours', 'cdtg')
CDTG_SIZE = 321                 # Lilacis/CD_TG dataloader/wbc.py: transforms.Resize(size=(321, 321))


def snap_mask(mask: np.ndarray) -> np.ndarray:
    r"""Snap every value of a uint8 mask to the nearest of {0, 128, 255}."""
    return SNAP[mask]


def class_mask(mask: np.ndarray, name: str, protocol: str = 'ours') -> np.ndarray:
    r"""Binary (bool) mask of class `name` in a raw WBC mask under `protocol` (see the module docstring)."""
    if protocol == 'cdtg' and name == 'cytoplasm':
        return mask >= 128
    return snap_mask(mask) == CODES[name]


def parse_subset(value) -> list[str]:
    text = 'all' if value is None else str(value).strip().lower()
    if text == 'all':
        return ['1', '2']
    if text in SUBSET_DIRS:
        return [text]
    raise UserError(f'--wbc-subset must be 1, 2 or all (got {value!r})')


class WBC(CheckedDataset):
    r"""White blood cell nucleus and cytoplasm; items are 'ds1/001' style keys."""
    name = 'wbc'
    domain = 'target'
    splits = ('test',)
    options = {'wbc_subset': '1, 2 or all (default: all, pooled)',
               'wbc_protocol': 'ours (default: cytoplasm = the 128 ring, nucleus = 255, 600 class-balanced episodes '
                               'at --img-size) or cdtg (the CD-TG release: cytoplasm = mask >= 128, i.e. the whole '
                               'cell, nucleus = 255, 321x321, every image once as the query)'}
    layout = ('  WBC/   (or segmentation_WBC/ as cloned, or --datapath pointing at it)\n'
              '    Dataset 1/001.bmp + 001.png ... 300.bmp + 300.png   (masks: 0 background, 128 cytoplasm, 255 '
              'nucleus)\n'
              '    Dataset 2/001.bmp + 001.png ... 100.bmp + 100.png')

    def __init__(self, datapath, split: str | None = None, nshot: int = 1, img_size: int = 400, **options):
        super().__init__(datapath, split, nshot, img_size, **options)
        if self.protocol == 'cdtg':
            self.img_size = CDTG_SIZE

    def configure(self, wbc_subset=None, wbc_protocol=None) -> None:
        self.subsets = parse_subset(wbc_subset)
        self.protocol = (wbc_protocol or 'ours').strip().lower()
        if self.protocol not in PROTOCOLS:
            raise UserError(f'--wbc-protocol must be one of {", ".join(PROTOCOLS)} (got {wbc_protocol!r})')

    def conventions(self) -> dict:
        return {'wbc_protocol': self.protocol, 'wbc_subset': '+'.join(self.subsets)}

    @property
    def default_episodes(self) -> int:
        return len(self.pairs) if self.protocol == 'cdtg' else super().default_episodes

    def sample_episodes(self, n: int, seed: int) -> list[Episode]:
        r"""`ours`: the class-balanced episodes of every benchmark. `cdtg`: every (image, class) pair once as the
        query, class by class in file order, with seeded random supports."""
        if self.protocol != 'cdtg':
            return super().sample_episodes(n, seed)
        pairs = [(c, key) for c in self.usable_classes for key in self.class_items[c]]
        if n != len(pairs):
            raise UserError(f'--wbc-protocol cdtg uses every image once as the query ({len(pairs)} episodes here); '
                            f'leave out --episodes (got {n})')
        rng = np.random.default_rng(seed)
        return [Episode(c, key, self.sample_supports(rng, c, key)) for c, key in pairs]

    def describe(self) -> str:
        size = f', {CDTG_SIZE}x{CDTG_SIZE} as the CD-TG loader' if self.protocol == 'cdtg' else ''
        return f'{super().describe()} (--wbc-protocol {self.protocol}{size})'

    def find_root(self) -> Path:
        markers = tuple(d for s in self.subsets for d in SUBSET_DIRS[s])
        root = first_existing([self.datapath / r for r in ROOTS] + [self.datapath], markers)
        if root is None:
            raise layout_error(self, self.datapath / ROOTS[0] / SUBSET_DIRS[self.subsets[0]][0],
                               also=f'{", ".join(r + "/" for r in ROOTS[1:])} and --datapath itself')
        return root

    def scan(self, full: bool) -> DataReport:
        root = self.find_root()
        report = DataReport(self.name, root, full)
        self._paths: dict[str, tuple[Path, Path]] = {}
        items: list[list[str]] = [[] for _ in CLASSES]
        for subset in self.subsets:
            folder = next((root / d for d in SUBSET_DIRS[subset] if (root / d).is_dir()), None)
            if folder is None:
                raise layout_error(self, root / SUBSET_DIRS[subset][0],
                                   also=' and '.join(f'"{d}"' for d in SUBSET_DIRS[subset][1:]))
            images = {p.stem: p for p in list_files(folder, ('.bmp',))}
            masks = {p.stem: p for p in list_files(folder, ('.png',))}
            if not masks:
                raise layout_error(self, folder / 'NNN.png', what='mask files')
            for stem in sorted(set(images) - set(masks)):
                report.add('image_without_mask', images[stem], 'no mask; not used', hard=False)
            for stem in sorted(masks):
                key = f'ds{subset}/{stem}'
                if stem not in images:
                    report.add('mask_without_image', masks[stem], f'image {folder / (stem + ".bmp")} does not exist',
                               key)
                    continue
                # Masks are tiny, so even a construction decodes them: class membership depends on their content.
                raw = check_pair(report, key, images[stem], masks[stem], full=True, allowed=None)
                if raw is None:
                    continue
                note_values(report, masks[stem], raw, (0, 128, 255), None)
                self._paths[key] = (images[stem], masks[stem])
                for c, name in enumerate(CLASSES):
                    if class_mask(raw, name, self.protocol).any():
                        items[c].append(key)
            report.notes.append(f'{folder.name}: {sum(k.startswith(f"ds{subset}/") for k in self._paths)} pairs')
        if any(p.kind == 'unexpected_values' for p in report.problems):
            report.notes.append('stray mask values are snapped to the nearest of 0 / 128 / 255 before the classes are '
                                'read (nucleus 255, cytoplasm 128)')
        report.class_names, report.class_items = list(CLASSES), items
        return report

    def read_mask(self, key, class_id):
        return class_mask(open_mask(self._paths[key][1]), CLASSES[class_id], self.protocol).astype(np.uint8)

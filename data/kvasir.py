r"""Kvasir-SEG (Simula; Jha et al., "Kvasir-SEG: A Segmented Polyp Dataset", MMM 2020): 1,000 colonoscopy images,
each with the mask of its polyp(s); one class, `polyp`. A target domain: tested on, never trained or selected on.

Layout: the official archive `kvasir-seg.zip` (https://datasets.simula.no/kvasir-seg/) unpacks as
  Kvasir-SEG/images/<id>.jpg   1,000 RGB JPEGs of varying sizes (about 332x487 to 1920x1072)
  Kvasir-SEG/masks/<id>.jpg    one mask per image, same file name, same size
  Kvasir-SEG/kavsir_bboxes.json  (bounding boxes; not used)
`--datapath` may name the folder holding `Kvasir-SEG/` (or `kvasir-seg/`) or `Kvasir-SEG/` itself. Images and masks
are paired by file name (stem). An image without its mask, a mask without its image, an unreadable or truncated
file and a mask whose size differs from its image are hard problems (the loader stops and names the files, or
leaves those items out with --skip-bad); construction reads only the file headers and tails, never the pixels.

Masks: JPEGs, so a drawn 0/255 mask comes back with compression noise (values such as 0-10 and 245-255, and a few
intermediate values along the polyp's edge), stored as RGB or L. Rule: foreground = luminance (PIL's 'L'
conversion, which for a gray mask is its value whatever the mode) >= 128 (`binarise`). Unlike the 0/255 PNG
benchmarks, a mask whose maximum is 1 is *not* read as 0/1 coded: in a JPEG that is an empty mask with noise.
A mask must be near-binary: at most 10 % of its pixels may lie in the mid-gray band 32-223 (a JPEG-compressed
0/255 mask has well under 1 % there, only along edges). Anything else (a photo or a colour annotation saved as a
mask) is refused (`mask_problem`): scripts/check_data.py reports it as an error (it decodes every mask), and an
episode that reads it stops with an error naming the file. A mask without foreground is reported as a warning.

Episodes: the protocol of every 2D target here (as ISIC and Chest X-ray): 600 seeded episodes by default, each of
the one class, the query drawn uniformly over the images, the K supports drawn from the other images (never the
query); images resized to 400x400 (--img-size) bilinearly, masks nearest, ImageNet normalisation, class-wise
accumulated IoU. The split is `test` (all 1,000 images); the official 880/120 train/validation split is not used.
"""
from pathlib import Path

import numpy as np

from common.errors import UserError
from data.checks import (CheckedDataset, DataReport, check_pair, find_dataset_root, list_files, open_mask)

CLASSES = ['polyp']
ROOTS = ('Kvasir-SEG', 'kvasir-seg')
IMG_DIR, MASK_DIR = 'images', 'masks'
EXTENSIONS = ('.jpg', '.jpeg')
ARCHIVE = 'kvasir-seg.zip (https://datasets.simula.no/kvasir-seg/)'
THRESHOLD = 128            # foreground: luminance >= THRESHOLD
GRAY_BAND = (32, 223)      # mid-gray values, inclusive: rare in a JPEG-compressed 0/255 mask (edges only)
MAX_GRAY_FRACTION = 0.10   # more mid-gray pixels than this: not a binary mask


def binarise(mask: np.ndarray) -> np.ndarray:
    r"""A Kvasir-SEG mask (2D uint8 luminance, JPEG noise included) as 0/1 uint8: 1 where the value is >= 128."""
    return (np.asarray(mask) >= THRESHOLD).astype(np.uint8)


def gray_fraction(mask: np.ndarray) -> float:
    r"""The fraction of pixels in the mid-gray band 32-223 (inclusive)."""
    mask = np.asarray(mask)
    if not mask.size:
        return 0.0
    lo, hi = GRAY_BAND
    return float(((mask >= lo) & (mask <= hi)).mean())


def mask_problem(mask: np.ndarray) -> str | None:
    r"""Why a decoded mask (2D uint8 luminance) is not a near-binary mask; None when it is one."""
    fraction = gray_fraction(mask)
    if fraction <= MAX_GRAY_FRACTION:
        return None
    lo, hi = GRAY_BAND
    return (f'not a binary mask: {100 * fraction:.1f}% of its pixels are mid-gray ({lo}-{hi}), where a JPEG-compressed '
            f'0/255 mask has at most a thin edge of such values (the limit is {100 * MAX_GRAY_FRACTION:.0f}%); is it a '
            f'photo or a colour annotation saved as a mask? Replace it by the mask of the same name from {ARCHIVE}')


class Kvasir(CheckedDataset):
    r"""Kvasir-SEG polyp segmentation: the (image, mask) pairs of `images/` and `masks/`, keyed by file stem."""
    name = 'kvasir'
    domain = 'target'
    splits = ('test',)
    layout = ('  Kvasir-SEG/   (as kvasir-seg.zip unpacks; or kvasir-seg/, or --datapath pointing at this folder)\n'
              '    images/cju0qkwl35piu0993l0dewei2.jpg ...   (1,000 RGB JPEGs of varying sizes)\n'
              '    masks/cju0qkwl35piu0993l0dewei2.jpg ...    (the same names and sizes; JPEG 0/255 masks, binarised '
              'at luminance >= 128)')

    def find_root(self) -> Path:
        return find_dataset_root(self, ROOTS, (IMG_DIR, MASK_DIR))

    def repair_hint(self) -> str:
        return f'extract these files again from {ARCHIVE}'

    def _files(self, folder: Path, what: str, report: DataReport) -> dict[str, Path]:
        r"""stem -> file of one folder's JPEGs; a stem spelled twice (a.jpg and a.jpeg) is a hard problem."""
        found: dict[str, Path] = {}
        for path in list_files(folder, EXTENSIONS):
            if path.stem in found:
                report.add('other', path, f'a second {what} named {path.stem} (the other is {found[path.stem].name}); '
                                          'keep one of them', path.stem)
                continue
            found[path.stem] = path
        if not found:
            others = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith('.'))[:3]
            seen = f' (it holds {", ".join(others)} ...)' if others else ' (it is empty)'
            raise UserError(f'{self.name}: no {what} (*.jpg) in {folder}{seen}; extract {ARCHIVE} again.\n'
                            f'Expected layout under --datapath {self.datapath}:\n{self.layout}')
        return found

    def scan(self, full: bool) -> DataReport:
        root = self.find_root()
        report = DataReport(self.name, root, full)
        img_dir, mask_dir = root / IMG_DIR, root / MASK_DIR
        images = self._files(img_dir, 'image', report)
        masks = self._files(mask_dir, 'mask', report)
        self._paths: dict[str, tuple[Path, Path]] = {}
        items: list[str] = []
        for stem in sorted(set(masks) - set(images)):
            report.add('mask_without_image', masks[stem], f'its image {img_dir / (stem + ".jpg")} is missing', stem)
        noisy = 0
        for stem in sorted(images):
            if stem not in masks:
                report.add('image_without_mask', images[stem], f'its mask {mask_dir / (stem + ".jpg")} is missing',
                           stem)
                continue
            # Quick: headers and tails only (sizes compared from the headers). Full: the mask decoded to luminance.
            mask = check_pair(report, stem, images[stem], masks[stem], full, allowed=None)
            self._paths[stem] = (images[stem], masks[stem])
            items.append(stem)
            if mask is None:
                continue
            problem = mask_problem(mask)
            if problem:
                report.add('unexpected_values', masks[stem], problem, stem)
                continue
            noisy += bool(((mask != 0) & (mask != 255)).any())
            if not binarise(mask).any():
                report.add('empty_mask', masks[stem], 'no pixel reaches luminance 128: as a support it carries no '
                                                      'information, as a query it scores 0 IoU', stem, hard=False)
        if full and noisy:
            report.notes.append(f'{noisy} of {len(items)} masks hold JPEG compression values besides 0 and 255 '
                                f'(expected for Kvasir-SEG); every mask is binarised at luminance >= {THRESHOLD}')
        report.class_names, report.class_items = list(CLASSES), [items]
        return report

    def read_mask(self, key: str, class_id: int) -> np.ndarray:
        path = self._paths[key][1]
        mask = open_mask(path)
        problem = mask_problem(mask)
        if problem:
            raise UserError(f'{self.name}: mask file {path} is {problem}')
        return binarise(mask)

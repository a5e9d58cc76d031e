r"""Layout and file checks shared by the benchmark loaders (on construction) and scripts/check_data.py (thorough).

A loader's `scan(full)` walks its layout and fills a `DataReport`: the class index plus every problem found, each
tied to the item it disqualifies. Two depths:
  * quick (every construction): folders, pairing, and a header + tail check of every file: the header must parse,
    a PNG must end with its IEND chunk, a JPEG with its end-of-image marker, a raw BMP must hold all its rows. This
    catches missing, empty, foreign and truncated files for a few hundred microseconds per file, and image/mask size
    mismatches from the headers, without decoding pixels;
  * full (scripts/check_data.py): additionally decodes every file and checks the mask values.
A file damaged in a way only a full decode detects still fails with an error naming it when an episode loads it.

Hard problems (missing or unreadable files, broken pairs, size mismatches) stop the loader with one message that
lists them, unless `--skip-bad` is given: then the affected items are dropped with a warning that counts them.
Soft problems (images without masks, mask values that the benchmark's rule snaps or binarises, images without a
class) are reported by the checker and summarised in the loader's description.
"""
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import UserError
from data.episodic import EpisodicDataset, layout_error

KIND_TITLES = {
    'missing': 'missing files',
    'unreadable': 'unreadable or corrupt files',
    'image_without_mask': 'images without masks',
    'mask_without_image': 'masks without images',
    'size_mismatch': 'image/mask size mismatches',
    'unexpected_values': 'unexpected mask values',
    'empty_mask': 'masks without foreground',
    'unclassified': 'images without class information',
    'exif_orientation': 'images with an EXIF orientation (read as stored, not as displayed)',
    'other': 'other problems',
}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
_TAIL_BYTES = 4096


@dataclass
class Problem:
    r"""One finding. `key` is the dataset item it disqualifies (None: informational); `hard` ones stop a loader."""
    kind: str
    path: str
    detail: str = ''
    key: str | None = None
    hard: bool = True

    def line(self) -> str:
        return f'{self.path}' + (f': {self.detail}' if self.detail else '')


class DataReport:
    r"""What a scan found: the class index (`class_names`, `class_items`), problems, and free-form notes."""

    def __init__(self, benchmark: str, root: Path | str, full: bool):
        self.benchmark = benchmark
        self.root = Path(root)
        self.full = full
        self.class_names: list[str] = []
        self.class_items: list[list[str]] = []
        self.problems: list[Problem] = []
        self.notes: list[str] = []        # facts worth printing (e.g. where the classes came from)
        self.warnings: list[str] = []     # things the user should act on; loaders re-emit them as warnings
        self.files_checked = 0
        self.zero_one_masks = 0           # binary masks coded 0/1 instead of 0/255 (recognised, not an error)

    def add(self, kind: str, path: Path | str, detail: str = '', key: str | None = None, hard: bool = True) -> None:
        if kind not in KIND_TITLES:
            raise ValueError(kind)
        self.problems.append(Problem(kind, str(path), detail, key, hard))

    @property
    def hard(self) -> list[Problem]:
        return [p for p in self.problems if p.hard]

    @property
    def soft(self) -> list[Problem]:
        return [p for p in self.problems if not p.hard]

    def bad_keys(self) -> set[str]:
        r"""Items disqualified by a hard problem (dropped with --skip-bad)."""
        return {p.key for p in self.hard if p.key is not None}

    def usable_items(self) -> list[list[str]]:
        bad = self.bad_keys()
        return [[k for k in items if k not in bad] for items in self.class_items]

    def counts(self) -> dict[str, int]:
        return {name: len(items) for name, items in zip(self.class_names, self.usable_items())}

    def by_kind(self, hard: bool | None = None) -> dict[str, list[Problem]]:
        groups: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            if hard is None or p.hard == hard:
                groups[p.kind].append(p)
        return {k: groups[k] for k in KIND_TITLES if k in groups}

    def summary(self, hard: bool) -> str:
        r"""'3 masks without images, 1 unreadable or corrupt file' (empty when there is none)."""
        return ', '.join(f'{len(ps)} {KIND_TITLES[k]}' for k, ps in self.by_kind(hard).items())

    def format(self, limit: int = 20) -> str:
        r"""The full human-readable report printed by scripts/check_data.py."""
        depth = 'full decode' if self.full else 'headers only'
        lines = [f'{self.benchmark}: {self.root} ({self.files_checked} files checked, {depth})', 'counts per class:']
        for name, n in self.counts().items():
            lines.append(f'  {name}: {n}')
        lines.extend(f'note: {n}' for n in self.notes)
        if self.zero_one_masks:
            lines.append(f'note: {self.zero_one_masks} binary masks are coded 0/1 instead of 0/255; they are read as '
                         '1 = foreground')
        lines.extend(f'warning: {w}' for w in self.warnings)
        groups = self.by_kind()
        lines.append('checks:')
        for kind in ('image_without_mask', 'mask_without_image', 'unreadable', 'missing', 'size_mismatch',
                     'unexpected_values', 'unclassified', 'empty_mask', 'exif_orientation', 'other'):
            problems = groups.get(kind, [])
            if not problems and kind in ('unclassified', 'empty_mask', 'exif_orientation', 'other'):
                continue
            n_hard = sum(p.hard for p in problems)
            tag = (f' ({n_hard} ERROR{"S" if n_hard > 1 else ""})' if n_hard else ' (warning)') if problems else ''
            lines.append(f'  {KIND_TITLES[kind]}: {len(problems)}{tag}')
            lines.extend(f'    {"ERROR " if p.hard else ""}{p.line()}' for p in problems[:limit])
            if len(problems) > limit:
                lines.append(f'    ... and {len(problems) - limit} more')
        return '\n'.join(lines)

    def error_message(self, layout: str, command: str, limit: int = 10, repair: str = '') -> str:
        r"""The loader's UserError text for hard problems."""
        hard = self.hard
        lines = [f'{self.benchmark}: {self.summary(hard=True)} under {self.root}:']
        lines.extend(f'  [{KIND_TITLES[p.kind]}] {p.line()}' for p in hard[:limit])
        if len(hard) > limit:
            lines.append(f'  ... and {len(hard) - limit} more')
        repair = repair or 'repair or re-download these files'
        lines.append(f'Run `{command}` for the full report, {repair}, or pass --skip-bad to leave the affected items '
                     'out.')
        lines.append(f'Expected layout:\n{layout}')
        return '\n'.join(lines)


# --- file checks ------------------------------------------------------------------------------------------------
def _tail(path: Path, n: int) -> bytes:
    with open(path, 'rb') as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - n))
        return fh.read()


def _tail_problem(path: Path, img: Image.Image) -> str | None:
    r"""Cheap truncation test by format; None when the file looks complete."""
    fmt = img.format
    if fmt == 'PNG':
        if b'IEND' not in _tail(path, 64):
            return 'truncated PNG (no IEND chunk at the end)'
    elif fmt in ('JPEG', 'MPO'):
        # Entropy-coded JPEG data never contains FF D9 (byte stuffing), so a cut file has no EOI near its end.
        if b'\xff\xd9' not in _tail(path, _TAIL_BYTES):
            return 'truncated JPEG (no end-of-image marker)'
    elif img.tile and img.tile[0][0] == 'raw':
        tile = img.tile[0]
        args = tile[3]
        stride = args[1] if isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], int) else 0
        if stride > 0:
            height = tile[1][3] - tile[1][1]
            need = tile[2] + stride * height
            have = path.stat().st_size
            if have < need:
                return f'truncated {fmt} ({have} bytes, the header needs {need})'
    return None


def inspect_file(path: Path, full: bool, want_array: bool = False
                 ) -> tuple[tuple[int, int] | None, np.ndarray | None, str | None]:
    r"""Check one file: returns (width, height), the decoded 2D label array, and an error string (None when fine).

    Quick mode parses the header and checks the tail; full mode also decodes the pixels and, with `want_array`,
    returns them as a 2D uint8 gray array (converted to L like `open_mask`).
    """
    try:
        if path.stat().st_size == 0:
            return None, None, 'empty file (0 bytes)'
        with Image.open(path) as img:
            size = img.size
            if size[0] < 1 or size[1] < 1:
                return None, None, f'invalid image size {size}'
            problem = _tail_problem(path, img)
            if problem:
                return size, None, problem
            if not full:
                return size, None, None
            img.load()
            if not want_array:
                return size, None, None
            arr = np.asarray(img if img.mode == 'L' else img.convert('L'))
            return size, arr.astype(np.uint8, copy=False), None
    except FileNotFoundError:
        return None, None, 'file does not exist'
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return None, None, f'unreadable ({type(err).__name__}: {err})'


def check_pair(report: DataReport, key: str, image: Path, mask: Path, full: bool,
               allowed: tuple[int, ...] | None = (0, 255)) -> np.ndarray | None:
    r"""Check an image and its mask (readable, complete, same size; full mode: mask values within `allowed`).

    Returns the decoded mask in full mode (so a loader can derive class membership), else None.
    """
    report.files_checked += 2
    isize, _, ierr = inspect_file(image, full)
    msize, mask_arr, merr = inspect_file(mask, full, want_array=True)
    if ierr:
        report.add('missing' if ierr == 'file does not exist' else 'unreadable', image, ierr, key)
    if merr:
        report.add('missing' if merr == 'file does not exist' else 'unreadable', mask, merr, key)
    if ierr or merr:
        return None
    if isize != msize:
        report.add('size_mismatch', mask, f'mask is {msize[0]}x{msize[1]} but image {image.name} is '
                                          f'{isize[0]}x{isize[1]}', key)
        return None
    orientation = exif_orientation(image)
    if orientation not in (None, 1):
        report.add('exif_orientation', image, f'EXIF orientation {orientation}: the loaders read the stored pixels '
                                              '(as the reference loaders do), not the rotated/mirrored image a viewer '
                                              'shows; its mask must match the stored pixels', key, hard=False)
    if mask_arr is not None and allowed == (0, 255):
        binary = binary_mask(mask_arr)
        if mask_arr.max() == 1:
            report.zero_one_masks += 1                       # recognised (read as 1 = foreground), summarised once
        else:
            note_values(report, mask, mask_arr, allowed, key)
        if not binary.any():
            report.add('empty_mask', mask, 'no foreground pixel: as a support it carries no information, as a '
                                           'query it scores 0 IoU', key, hard=False)
    elif mask_arr is not None and allowed is not None:
        note_values(report, mask, mask_arr, allowed, key)
    return mask_arr


def binary_mask(arr: np.ndarray) -> np.ndarray:
    r"""Foreground of a binary mask as 0/1 uint8: masks coded 0/255 (or with stray values from resampling) are
    binarised at >= 128; masks coded 0/1 (max value 1) are recognised as such instead of thresholding to empty."""
    if arr.size and arr.max() == 1:
        return arr.astype(np.uint8, copy=False)
    return (arr >= 128).astype(np.uint8)


def pair_by_stem(report: DataReport, images: dict[str, Path], masks: dict[str, Path], mask_dir: Path, prefix: str,
                 full: bool) -> list[tuple[str, Path, Path]]:
    r"""Pair one folder's images and binary (0/255) masks by file stem, image-driven: an image without its
    `<mask_dir>/<stem>.png` is a problem, a mask without an image a warning. Each pair is checked with `check_pair`;
    returns (key, image, mask) for every image with a mask, key = prefix + stem."""
    for stem in sorted(set(masks) - set(images)):
        report.add('mask_without_image', masks[stem], 'no image; not used', hard=False)
    pairs = []
    for stem in sorted(images):
        key = prefix + stem
        if stem not in masks:
            report.add('image_without_mask', images[stem], f'mask {mask_dir / (stem + ".png")} is missing', key)
            continue
        check_pair(report, key, images[stem], masks[stem], full, allowed=(0, 255))
        pairs.append((key, images[stem], masks[stem]))
    return pairs


def note_values(report: DataReport, path: Path, arr: np.ndarray, allowed: tuple[int, ...], key: str | None,
                hard: bool = False) -> None:
    r"""Report pixel values outside `allowed` (soft by default: the loader's rule snaps or binarises them)."""
    counts = np.bincount(arr.ravel(), minlength=256)
    stray = [v for v in np.flatnonzero(counts) if v not in allowed]
    if stray:
        shown = ', '.join(f'{v} ({counts[v]} px)' for v in stray[:8]) + (' ...' if len(stray) > 8 else '')
        report.add('unexpected_values', path, f'values outside {{{", ".join(map(str, allowed))}}}: {shown}', key, hard)


def list_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    r"""Regular, visible files of `folder` with one of `extensions` (case-insensitive), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in extensions and not p.name.startswith('.') and p.is_file())


WIDE_MODES = ('I;16', 'I;16B', 'I;16L', 'I', 'F')


def exif_orientation(path: Path) -> int | None:
    r"""The EXIF orientation tag of an image file (1 = as stored; None: no tag or unreadable)."""
    try:
        with Image.open(path) as img:
            return img.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
        return None


def wide_to_uint8(arr: np.ndarray, path: Path, is_float: bool) -> np.ndarray:
    r"""16/32-bit integer or float intensities as 8 bit, by their actual range: a float image within [0, 1] is
    scaled by 255 (so it reads as its 8-bit version), values within [0, 255] are kept, any other range (16-bit,
    CT/MR intensities) is min-max scaled to 0-255 (PIL's own conversion would clip at 255). NaN/inf: `UserError`."""
    arr = np.asarray(arr, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise UserError(f'image file {path} has {int(bad.sum())} NaN/inf pixel values; replace them (e.g. by the '
                        'image\'s minimum) and save it again')
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if is_float and lo >= 0 and hi <= 1:
        arr = arr * 255.0
    elif not (lo >= 0 and hi <= 255):
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    return np.rint(arr).astype(np.uint8)


def open_rgb(path: Path, upright: bool = False) -> Image.Image:
    r"""Open an image as 8-bit RGB, naming the file on failure; 16-bit/float grayscale by `wide_to_uint8`.
    `upright`: apply its EXIF orientation (a user's photo as a viewer shows it; the dataset loaders read the stored
    pixels, as the reference loaders)."""
    try:
        with Image.open(path) as img:
            if upright:
                img = ImageOps.exif_transpose(img)
            if img.mode in WIDE_MODES:
                arr = wide_to_uint8(np.asarray(img), path, img.mode == 'F')
                return Image.fromarray(arr).convert('RGB')
            return img.convert('RGB')
    except FileNotFoundError as err:
        raise UserError(f'image file {path} does not exist (it was there when the dataset was indexed)') from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f'image file {path} is unreadable or corrupt ({err}); run scripts/check_data.py to list '
                        'every damaged file') from err


def open_mask(path: Path) -> np.ndarray:
    r"""A mask as a 2D uint8 gray array, naming the file on failure. Like the PATNet loaders (`convert('L')`), any
    other mode is converted to gray: 1-bit masks become 0/255 and palette masks their colours' luminance."""
    try:
        with Image.open(path) as img:
            if img.mode != 'L':
                img = img.convert('L')
            return np.asarray(img).astype(np.uint8, copy=False)
    except FileNotFoundError as err:
        raise UserError(f'mask file {path} does not exist (it was there when the dataset was indexed)') from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f'mask file {path} is unreadable or corrupt ({err}); run scripts/check_data.py to list '
                        'every damaged file') from err


def open_binary_mask(path: Path, upright: bool = False) -> np.ndarray:
    r"""A user's binary mask as a 2D 0/1 uint8 array (1 = foreground), whatever its encoding:

    * 8-bit gray: 0/255 binarised at >= 128, or 0/1 (see `binary_mask`);
    * RGB, and RGBA whose alpha is 255 everywhere: a pixel is foreground when any of its R, G, B values is >= 128
      (0/1 masks: = 1), so a coloured annotation on black (e.g. red, which reads as gray 76) counts;
    * RGBA with transparency (an annotation layer): the opaque pixels (alpha >= 128) are foreground;
    * 16-bit or 32-bit gray: 0/1, 0/255 or 0/65535 (max <= 1: 1 is foreground; max <= 255: >= 128; else >= 32768);
    * palette (indexed) PNG: with a gray palette (every colour has R = G = B, as optimisers write gray masks) the
      colours' gray values are read as above; with a colour palette (label-map tools, PASCAL VOC) the *indices* are
      read: 0 = background, 255 = background (VOC's void border), any other index = foreground. Reading colours
      instead would turn VOC's dark red (128, 0, 0) into gray 38, an empty mask.
    `upright`: apply its EXIF orientation first (as `open_rgb`).
    """
    try:
        with Image.open(path) as img:
            img.load()
            if upright:
                img = ImageOps.exif_transpose(img)
            if img.mode in ('RGB', 'RGBA', 'LA'):
                arr = np.asarray(img)
                if img.mode in ('RGBA', 'LA') and arr[..., -1].min() < 255:
                    return (arr[..., -1] >= 128).astype(np.uint8)
                colour = arr[..., :3].max(axis=-1) if img.mode != 'LA' else arr[..., 0]
                return binary_mask(colour)
            if img.mode == 'P':
                arr = np.asarray(img)
                palette = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
                indices = np.unique(arr)
                used = palette[indices[indices < len(palette)]]
                if len(used) and (used[:, 0] == used[:, 1]).all() and (used[:, 1] == used[:, 2]).all():
                    return binary_mask(np.asarray(img.convert('L')))
                return ((arr != 0) & (arr != 255)).astype(np.uint8)
            if img.mode in WIDE_MODES:
                arr = np.asarray(img, dtype=np.float64)
                top = float(arr.max()) if arr.size else 0.0
                cut = 1.0 if top <= 1 else (128.0 if top <= 255 else 32768.0)
                return (arr >= cut).astype(np.uint8)
            return binary_mask(np.asarray(img if img.mode == 'L' else img.convert('L')))
    except FileNotFoundError as err:
        raise UserError(f'mask file {path} does not exist') from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f'mask file {path} is unreadable or corrupt ({type(err).__name__}: {err})') from err


def first_existing(candidates: list[Path], marker: str | tuple[str, ...]) -> Path | None:
    r"""The first candidate root that contains `marker` (a sub-path, or any of several)."""
    markers = (marker,) if isinstance(marker, str) else marker
    for root in candidates:
        if any((root / m).exists() for m in markers):
            return root
    return None


def find_dataset_root(dataset, roots: tuple[str, ...], subdirs: tuple[str, ...]) -> Path:
    r"""The first of `<datapath>/<root>` (for each accepted spelling) or `<datapath>` itself that holds one of
    `subdirs`; all of `subdirs` must then exist, else a layout error names the first missing folder."""
    candidates = [dataset.datapath / r for r in roots] + [dataset.datapath]
    root = first_existing(candidates, subdirs)
    if root is None:
        others = ' and '.join([f'"{r}/{subdirs[0]}"' for r in roots[1:]] + [f'{subdirs[0]}/ directly under --datapath'])
        raise layout_error(dataset, dataset.datapath / roots[0] / subdirs[0], also=others)
    for sub in subdirs:
        if not (root / sub).is_dir():
            raise layout_error(dataset, root / sub)
    return root


# --- the loader base ----------------------------------------------------------------------------------------------
class CheckedDataset(EpisodicDataset):
    r"""A benchmark read from its downloaded layout: `scan(full)` -> report -> error, or skip with --skip-bad.

    Subclasses implement `configure(**options)` (store and validate their options; no file access) and `scan(full)`
    (walk the layout, raise `UserError` with the expected layout when a folder is missing, fill a `DataReport`).
    `check()` runs the same scan for scripts/check_data.py without building a dataset.
    """

    default_split = 'test'
    switches = {'skip_bad': 'leave out items whose files are missing, truncated or unreadable (with a warning that '
                            'counts them) instead of stopping'}

    def __init__(self, datapath, split: str | None = None, nshot: int = 1, img_size: int = 400,
                 skip_bad: bool | None = None, **options):
        split = split or self.default_split
        self._setup(datapath, split, bool(skip_bad), **options)
        super().__init__(datapath, split=split, nshot=nshot, img_size=img_size)

    def _setup(self, datapath, split: str, skip_bad: bool, **options) -> None:
        self.datapath = Path(datapath)
        self.split = split
        self.skip_bad = skip_bad
        self.skipped: list[str] = []
        self.configure(**options)

    def configure(self, **options) -> None:
        if options:
            raise TypeError(f'unexpected options {sorted(options)}')

    # --- reading: image and binary mask files paired by `scan` in `self._paths` (key -> (image, mask)) ----------
    def read_image(self, key: str) -> Image.Image:
        return open_rgb(self._paths[key][0])

    def read_mask(self, key: str, class_id: int) -> np.ndarray:
        r"""The mask file as 0/1 (0/255 or 0/1 coded, `binary_mask`); benchmarks with class-coded masks override it."""
        return binary_mask(open_mask(self._paths[key][1]))

    def scan(self, full: bool) -> DataReport:
        raise NotImplementedError

    @classmethod
    def check(cls, datapath, split: str | None = None, full: bool = True, **options) -> DataReport:
        r"""Scan a layout without building the dataset (scripts/check_data.py)."""
        obj = cls.__new__(cls)
        split = split or cls.default_split
        if split not in cls.splits:
            raise UserError(f'benchmark {cls.name!r} has no {split!r} split (available: {", ".join(cls.splits)})')
        obj._setup(datapath, split, False, **{k: v for k, v in options.items() if v is not None})
        return obj.scan(full)

    def check_command(self) -> str:
        return f'python scripts/check_data.py --benchmark {self.name} --datapath {self.datapath}'

    def repair_hint(self) -> str:
        r"""How to fix the files behind hard problems (empty: repair or re-download them)."""
        return ''

    def build_index(self):
        report = self.scan(full=False)
        self.report = report
        if report.hard and (not self.skip_bad or any(p.key is None for p in report.hard)):
            raise UserError(report.error_message(self.layout, self.check_command(), repair=self.repair_hint()))
        for message in report.warnings:
            warnings.warn(f'{self.name}: {message}', stacklevel=2)
        if report.hard:
            bad = report.bad_keys()
            self.skipped = sorted(bad)
            warnings.warn(f'{self.name}: --skip-bad left out {len(bad)} items ({report.summary(hard=True)}); '
                          f'`{self.check_command()}` lists them', stacklevel=2)
        return list(report.class_names), report.usable_items()

    def describe(self) -> str:
        text = super().describe()
        extras = []
        soft = self.report.summary(hard=False) if hasattr(self, 'report') else ''
        if soft:
            extras.append(soft)
        if self.skipped:
            extras.append(f'{len(self.skipped)} items skipped (--skip-bad)')
        return text + (f' [{"; ".join(extras)}]' if extras else '')

r"""CHAOS MR T2-SPIR (20 labelled abdominal volumes): DICOM preparation and the `chaos` benchmark.

Raw layout (Zenodo record 3431873, `CHAOS_Train_Sets.zip`): `CHAOS/Train_Sets/MR/<pid>/T2SPIR/DICOM_anon/*.dcm`
with one label PNG per slice in `.../T2SPIR/Ground/<same stem>.png`. `scripts/prepare_chaos.py` (`prepare()`)
  1. reads every slice with pydicom (modality LUT applied: RescaleSlope/Intercept) and sorts them by
     ImagePositionPatient projected on the slice normal (row x column direction cosines), falling back to
     InstanceNumber, then to the file name (with a warning);
  2. pairs each slice with `Ground/<its own stem>.png` (never by position), and maps the gray ranges to organ ids:
     0 background, 55-70 liver (1), 110-135 right kidney (2), 175-200 left kidney (3), 240-255 spleen (4); any
     other value is an error naming the file;
  3. clips intensities above the volume's 99.5th percentile and rescales the volume to [0, 1] ((x - min) /
     (p99.5 - min)), stored as float32. No resampling and no cropping: slices keep their DICOM grid, because every
     slice is resized to --img-size for the network anyway and the 3D Dice is computed on this grid. (SSL-ALPNet /
     Q-Net additionally resample to 1.25x1.25x7.70 mm and crop to 256x256, which changes the slice count; numbers
     are therefore close to, not identical with, theirs);
  4. writes `image_<pid>.npy`, `label_<pid>.npy` (D x H x W, slices in position order) and `manifest.json` (order
     method, spacing, clip value, per-organ slice indices) into `<datapath>/CHAOS/prepared_T2SPIR/` (or --out).
The loader reads only that cache. Networks see a slice as round(255 x value) replicated to RGB with ImageNet
normalisation, like every other target. Two protocols: the default 2D episodes (4 organ classes, query and
support are organ-containing slices of *different* patients, 600 class-balanced episodes) and the volumetric
SSL-ALPNet / Q-Net protocol in `engine/volumetric.py` (`test.py --protocol volumetric`), the primary CHAOS metric.
The cache writer and the loader are shared with the other volumetric benchmarks (`PreparedVolumes`, data/volumes.py).
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import UserError
from data.checks import DataReport, list_files
from data.volumes import MR_CLIP_PERCENTILE, MANIFEST, PreparedVolumes, percentile_normalise, pid_order, prepare_cache

__all__ = ['CACHE_NAME', 'LABEL_LUT', 'MANIFEST', 'ORGANS', 'Chaos', 'labels_from_png', 'order_slices', 'pid_order',
           'prepare']

ORGANS = ['liver', 'right kidney', 'left kidney', 'spleen']
GRAY_RANGES = [(55, 70), (110, 135), (175, 200), (240, 255)]
INVALID = 255
LABEL_LUT = np.full(256, INVALID, np.uint8)
LABEL_LUT[0] = 0
for _organ_id, (_lo, _hi) in enumerate(GRAY_RANGES, 1):
    LABEL_LUT[_lo:_hi + 1] = _organ_id
PREP_FORMAT = 'cdtg-chaos-t2spir'
PREP_VERSION = 1
CLIP_PERCENTILE = MR_CLIP_PERCENTILE
CACHE_NAME = 'prepared_T2SPIR'
RAW_ROOTS = ('CHAOS/Train_Sets/MR', 'Train_Sets/MR', 'CHAOS_Train_Sets/Train_Sets/MR', 'CHAOS/MR', 'MR')
RAW_LAYOUT = ('  CHAOS/Train_Sets/MR/   (as CHAOS_Train_Sets.zip unpacks; Train_Sets/MR/ directly under --datapath '
              'also works)\n'
              '    1/T2SPIR/DICOM_anon/IMG-0002-00001.dcm ...\n'
              '    1/T2SPIR/Ground/IMG-0002-00001.png ...   (same stems; liver ~63, kidneys ~126/~189, spleen ~252)\n'
              '    2/ 3/ 5/ ... 39/   (20 patients)')


def find_raw_root(datapath: Path) -> Path | None:
    r"""The folder holding the patient folders, or None."""
    for rel in RAW_ROOTS:
        if (datapath / rel).is_dir():
            return datapath / rel
    if datapath.is_dir() and any((p / 'T2SPIR').is_dir() for p in datapath.iterdir() if p.is_dir()):
        return datapath      # --datapath points at Train_Sets/MR itself
    return None


def patient_dirs(raw_root: Path) -> list[Path]:
    r"""Patient folders (numeric names, or any folder holding T2SPIR/) sorted by numeric id, the order the
    volumetric folds refer to. Other folders (e.g. `__MACOSX`) are ignored."""
    dirs = [p for p in raw_root.iterdir() if p.is_dir() and not p.name.startswith(('.', '__'))
            and (p.name.isdigit() or (p / 'T2SPIR').is_dir())]
    return sorted(dirs, key=lambda p: pid_order(p.name))


# --- DICOM series ------------------------------------------------------------------------------------------------
def _read_dicom(path: Path):
    import pydicom
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as err:  # any pydicom/numpy failure on this file is a damaged or foreign file
        hint = ''
        if 'handler' in str(err).lower() or 'decode' in str(err).lower():
            hint = ' (compressed pixel data: install a decoder, e.g. `pip install pylibjpeg pylibjpeg-libjpeg`)'
        raise UserError(f'{path} is not a readable DICOM slice ({type(err).__name__}: {err}){hint}') from err
    if pixels.ndim != 2:
        raise UserError(f'{path}: expected a single-frame 2D slice, got pixel data of shape {pixels.shape}')
    slope = float(ds.get('RescaleSlope', 1) or 1)
    intercept = float(ds.get('RescaleIntercept', 0) or 0)
    return ds, pixels.astype(np.float32) * slope + intercept


def slice_position(ds, normal: np.ndarray | None) -> float | None:
    r"""ImagePositionPatient projected on the slice normal (None when the tags are missing or malformed)."""
    ipp = ds.get('ImagePositionPatient')
    if normal is None or ipp is None or len(ipp) != 3:
        return None
    return float(np.dot(normal, np.asarray([float(v) for v in ipp])))


def slice_normal(ds) -> np.ndarray | None:
    iop = ds.get('ImageOrientationPatient')
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray([float(v) for v in iop[:3]]), np.asarray([float(v) for v in iop[3:]])
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else None


def order_slices(headers: list) -> tuple[list[int], str]:
    r"""Indices of `headers` (pydicom datasets) in slice order and the method used: 'position', 'instance', 'file'.

    Position: ascending ImagePositionPatient . normal (normal from the first slice's ImageOrientationPatient);
    used when every slice has one and no two coincide. Else ascending InstanceNumber when complete and unique.
    Else the file-name order the caller passed in.
    """
    normal = slice_normal(headers[0]) if headers else None
    positions = [slice_position(ds, normal) for ds in headers]
    if all(p is not None for p in positions) and len(set(np.round(positions, 4))) == len(positions):
        return sorted(range(len(headers)), key=lambda i: positions[i]), 'position'
    numbers = [ds.get('InstanceNumber') for ds in headers]
    if all(n is not None and str(n).strip() != '' for n in numbers):
        numbers = [int(n) for n in numbers]
        if len(set(numbers)) == len(numbers):
            return sorted(range(len(headers)), key=lambda i: numbers[i]), 'instance'
    return list(range(len(headers))), 'file'


def label_value_problem(arr: np.ndarray) -> str | None:
    r"""Describe the gray values of a Ground PNG that are neither 0 nor inside an organ range (None if all fit)."""
    ids = LABEL_LUT[arr]
    if not (ids == INVALID).any():
        return None
    bad, counts = np.unique(arr[ids == INVALID], return_counts=True)
    shown = ', '.join(f'{v} ({n} px)' for v, n in zip(bad[:8], counts[:8])) + (' ...' if len(bad) > 8 else '')
    ranges = ', '.join(f'{o} {lo}-{hi}' for o, (lo, hi) in zip(ORGANS, GRAY_RANGES))
    return f'gray values outside 0 and the organ ranges ({ranges}): {shown}'


def labels_from_png(path: Path) -> np.ndarray:
    r"""A Ground PNG mapped to organ ids 0-4; a value outside 0 and the four gray ranges is a UserError."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img if img.mode in ('L', 'P') else img.convert('L')).astype(np.uint8, copy=False)
    except FileNotFoundError as err:
        raise UserError(f'label {path} does not exist') from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f'label {path} is unreadable or corrupt ({err})') from err
    problem = label_value_problem(arr)
    if problem:
        raise LabelValueError(f'label {path} has {problem}', problem)
    return LABEL_LUT[arr]


class LabelValueError(UserError):
    r"""A Ground PNG with values outside the organ ranges; `.detail` is the value description."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


@dataclass
class PatientVolume:
    r"""One prepared series: float32 intensities and uint8 organ ids, [D,H,W] in slice order."""
    pid: str
    image: np.ndarray
    label: np.ndarray
    stems: list[str]
    order: str
    spacing: list[float] = field(default_factory=list)


def load_patient(pdir: Path, report: DataReport) -> PatientVolume | None:
    r"""Read one patient's T2-SPIR series and labels; problems go to `report` (key = pid). None if unusable."""
    pid = pdir.name
    dcm_dir, gnd_dir = pdir / 'T2SPIR' / 'DICOM_anon', pdir / 'T2SPIR' / 'Ground'
    for d in (dcm_dir, gnd_dir):
        if not d.is_dir():
            report.add('missing', d, 'folder does not exist', pid)
            return None
    files = [p for p in sorted(dcm_dir.iterdir()) if p.is_file() and not p.name.startswith('.')
             and p.suffix.lower() in ('.dcm', '')]
    labels = {p.stem: p for p in list_files(gnd_dir, ('.png',))}
    if not files:
        report.add('missing', dcm_dir / '*.dcm', 'no DICOM slice', pid)
        return None
    headers, pixels, label_arrays, stems = [], [], [], []
    ok = True
    for path in files:
        report.files_checked += 1
        try:
            ds, px = _read_dicom(path)
        except UserError as err:
            report.add('unreadable', path, str(err).replace(f'{path} ', '', 1), pid)
            ok = False
            continue
        lpath = labels.get(path.stem)
        if lpath is None:
            report.add('image_without_mask', path, f'label {gnd_dir / (path.stem + ".png")} does not exist', pid)
            ok = False
            continue
        report.files_checked += 1
        try:
            ids = labels_from_png(lpath)
        except LabelValueError as err:
            report.add('unexpected_values', lpath, err.detail, pid)
            ok = False
            continue
        except UserError as err:
            report.add('unreadable', lpath, str(err).replace(f'label {lpath} ', '', 1), pid)
            ok = False
            continue
        if ids.shape != px.shape:
            report.add('size_mismatch', lpath, f'label is {ids.shape[1]}x{ids.shape[0]} but slice {path.name} is '
                                               f'{px.shape[1]}x{px.shape[0]}', pid)
            ok = False
            continue
        headers.append(ds)
        pixels.append(px)
        label_arrays.append(ids)
        stems.append(path.stem)
    for stem in sorted(set(labels) - {p.stem for p in files}):
        report.add('mask_without_image', labels[stem], 'no DICOM slice with this stem; not used', hard=False)
    if not ok:
        return None
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        report.add('size_mismatch', dcm_dir, f'slices of one series differ in size: {sorted(shapes)}', pid)
        return None
    order, method = order_slices(headers)
    if method != 'position':
        report.warnings.append(f'patient {pid}: slices sorted by '
                               f'{"InstanceNumber" if method == "instance" else "file name"} (ImagePositionPatient / '
                               'ImageOrientationPatient missing or not unique)')
    spacing = []
    try:
        row_col = [float(v) for v in headers[0].get('PixelSpacing', [])]
        normal = slice_normal(headers[0])
        pos = sorted(slice_position(h, normal) for h in headers) if method == 'position' else []
        dz = float(np.median(np.diff(pos))) if len(pos) > 1 else float(headers[0].get('SliceThickness', 0) or 0)
        spacing = [dz] + row_col if len(row_col) == 2 else []
    except (TypeError, ValueError):
        spacing = []
    return PatientVolume(pid, np.stack([pixels[i] for i in order]), np.stack([label_arrays[i] for i in order]),
                         [stems[i] for i in order], method, spacing)


def normalise_volume(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    r"""Clip above the 99.5th percentile, then (x - min) / (clip - min) -> float32 in [0, 1]. Returns (volume, min,
    clip value)."""
    return percentile_normalise(image, CLIP_PERCENTILE)


def prepare(datapath: Path | str, out: Path | str | None = None, skip_bad: bool = False,
            overwrite: bool = False) -> Path:
    r"""Build the prepared cache from the raw DICOM layout; returns the cache folder."""
    return prepare_cache(Chaos, datapath, out, skip_bad=skip_bad, overwrite=overwrite)


# --- the benchmark ------------------------------------------------------------------------------------------------
class Chaos(PreparedVolumes):
    r"""CHAOS T2-SPIR organs from the prepared cache; 2D episodes, and the volumetric protocol's accessors."""
    name = 'chaos'
    domain = 'target'
    splits = ('test',)
    options = {'chaos_cache': 'prepared cache folder (default <datapath>/CHAOS/prepared_T2SPIR, written by '
                              'scripts/prepare_chaos.py)'}
    protocols = ('2d', 'volumetric')
    layout = (f'{RAW_LAYOUT}\n  CHAOS/{CACHE_NAME}/manifest.json, image_<pid>.npy, label_<pid>.npy   (written by '
              '`python scripts/prepare_chaos.py --datapath DIR`)')
    volume_classes = tuple(ORGANS)
    title, raw_title, raw_format = 'CHAOS', 'CHAOS MR', 'DICOM'
    raw_roots, raw_also, raw_layout = RAW_ROOTS, 'Train_Sets/MR/', RAW_LAYOUT
    cache_subdir, cache_option, prepare_script = f'CHAOS/{CACHE_NAME}', 'chaos_cache', 'scripts/prepare_chaos.py'
    prep_format, prep_version = PREP_FORMAT, PREP_VERSION
    preprocessing = (f'slices sorted by position; intensities clipped above the {CLIP_PERCENTILE}th percentile per '
                     'volume and rescaled to [0, 1]; no resampling, no cropping')

    @classmethod
    def summary_lines(cls, manifest: dict) -> list[str]:
        return [f'slice order from: {", ".join(sorted({v["order"] for v in manifest["volumes"]}))}']

    def configure(self, chaos_cache: str | None = None) -> None:
        super().configure(chaos_cache=chaos_cache)

    @classmethod
    def find_raw_root(cls, datapath: Path) -> Path | None:
        return find_raw_root(datapath)

    @classmethod
    def iter_raw(cls, raw_root: Path, report: DataReport):
        for pdir in patient_dirs(raw_root):
            vol = load_patient(pdir, report)
            if vol is not None:
                yield vol

    @classmethod
    def prepare_volume(cls, vol: PatientVolume) -> tuple[np.ndarray, np.ndarray, dict]:
        image, lo, clip = normalise_volume(vol.image)
        return image, vol.label, {'order': vol.order, 'slices': vol.stems, 'spacing_zyx_mm': vol.spacing,
                                  'intensity_min': lo, 'clip_value': clip}

    @classmethod
    def manifest_fields(cls) -> dict:
        return {'label_ranges': {name: list(r) for name, r in zip(ORGANS, GRAY_RANGES)}}

r"""Reading NIfTI volumes (`.nii` / `.nii.gz`) for the volumetric benchmarks `abd-ct` and `cmr` (preparation only).

nibabel is imported on first use, so no other benchmark needs it. `read_nifti` returns the voxels slices first in
the *stored* voxel order: [k, j, i] for NIfTI axes (i, j, k), which is the array SimpleITK's `GetArrayFromImage`
gives (the reading of SSL-ALPNet's and Q-Net's preprocessing), with the world direction of each stored axis
(`axis_codes`, nibabel's closest-axis codes in RAS+ terms: 'L' means the index grows towards the patient's left).
"""
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserError
from data.checks import DataReport

NIFTI_SUFFIXES = ('.nii.gz', '.nii')


def nibabel():
    r"""The nibabel module, or a UserError saying how to install it."""
    try:
        import nibabel as nib
    except ImportError as err:
        raise UserError('reading NIfTI volumes (.nii / .nii.gz) of abd-ct and cmr needs nibabel: '
                        'pip install "nibabel>=5.0" (listed in requirements.txt)') from err
    return nib


def nifti_stem(path: Path) -> str | None:
    r"""The name without `.nii.gz` / `.nii` (None for any other file)."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return None


def numbered(folder: Path, pattern: re.Pattern, plain: bool = False) -> dict[str, Path]:
    r"""{id: path} of the NIfTI files in `folder` whose name (without .nii/.nii.gz) matches `pattern`, the id being
    its first group ('0001'), or with `plain` that number as a plain integer string ('1')."""
    found = {}
    for path in sorted(folder.iterdir()):
        stem = nifti_stem(path) if path.is_file() and not path.name.startswith('.') else None
        match = pattern.match(stem) if stem else None
        if match:
            found[str(int(match.group(1))) if plain else match.group(1)] = path
    return found


@dataclass
class NiftiVolume:
    r"""One volume: `data` float32 [D,H,W] = stored axes (k, j, i); `affine` 4x4 voxel -> RAS+ mm; `zooms` the voxel
    size in mm along (i, j, k); `axis_codes` the world direction of (i, j, k), e.g. ('L', 'P', 'S')."""
    path: Path
    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]
    axis_codes: tuple[str, str, str]

    @property
    def spacing_zyx(self) -> list[float]:
        r"""Voxel size in mm along the [D,H,W] axes."""
        return [float(self.zooms[2]), float(self.zooms[1]), float(self.zooms[0])]


def read_nifti(path: Path) -> NiftiVolume:
    r"""Read a 3D NIfTI volume (a 4D one with a single volume is accepted); a damaged or foreign file, or one of
    another dimensionality, is a UserError naming it."""
    nib = nibabel()
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        codes = tuple(str(c) for c in nib.aff2axcodes(affine))
    except FileNotFoundError as err:
        raise UserError(f'{path} does not exist') from err
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        detail = ' '.join(str(err).split())          # nibabel's messages may span lines
        raise UserError(f'{path} is not a readable NIfTI volume ({type(err).__name__}: {detail})') from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f'{path}: expected a 3D volume, got voxel data of shape {data.shape}')
    if not np.isfinite(data).all():
        raise UserError(f'{path}: {int((~np.isfinite(data)).sum())} voxels are NaN or infinite')
    return NiftiVolume(Path(path), np.ascontiguousarray(data.transpose(2, 1, 0)), affine, zooms, codes)


def map_label_codes(volume: NiftiVolume, lut: np.ndarray, invalid: int = 255) -> np.ndarray:
    r"""A label volume's codes mapped through `lut` (code -> class id; `invalid` marks a code that is not allowed)
    -> uint8 [D,H,W]. A non-integer value, a code outside the table, or one it marks `invalid` is a ValueError that
    lists the offending values and their voxel counts."""
    data = volume.data
    whole = np.rint(data) == data
    inside = whole & (data >= 0) & (data < len(lut))
    ids = lut[np.where(inside, data, 0).astype(np.int32)].astype(np.uint8)
    bad = ~inside | (ids == invalid)
    if bad.any():
        values, counts = np.unique(data[bad], return_counts=True)
        shown = ', '.join(f'{v:g} ({n} voxel{"s" if n > 1 else ""})' for v, n in zip(values[:8], counts[:8]))
        raise ValueError(shown + (' ...' if len(values) > 8 else ''))
    return ids


@dataclass
class RawVolume:
    r"""One raw volume read for preparation: intensities and class ids, [D,H,W] in stored order."""
    pid: str
    image: np.ndarray
    label: np.ndarray
    axis_codes: tuple[str, str, str]
    spacing: list[float]
    sources: list[str] = field(default_factory=list)


def read_pair(pid: str, img_path: Path, lab_path: Path, report: DataReport,
              label_codes: tuple[np.ndarray, int, str]) -> RawVolume | None:
    r"""Read an image and its label, and map the label's codes with `label_codes` = (lut, invalid, what a refused
    code is called in the report). A file that cannot be read, a label of another size or stored in another
    orientation than its image, or a code the table refuses goes to `report` (key = pid), naming the file; None
    then."""
    report.files_checked += 2
    volumes = []
    for path in (img_path, lab_path):
        try:
            volumes.append(read_nifti(path))
        except UserError as err:
            report.add('unreadable', path, str(err).replace(f'{path} ', '', 1).replace(f'{path}: ', '', 1), pid)
            return None
    image, label = volumes
    if label.data.shape != image.data.shape:
        report.add('size_mismatch', lab_path, f'label is {list(label.data.shape)} (D, H, W) but image '
                                              f'{img_path.name} is {list(image.data.shape)}', pid)
        return None
    if label.axis_codes != image.axis_codes:
        report.add('other', lab_path, f'stored axes {"".join(label.axis_codes)} but image {img_path.name} has '
                                      f'{"".join(image.axis_codes)}: the label would be mirrored', pid)
        return None
    lut, invalid, what = label_codes
    try:
        ids = map_label_codes(label, lut, invalid)
    except ValueError as err:
        report.add('unexpected_values', lab_path, f'{what}: {err}', pid)
        return None
    return RawVolume(pid, image.data, ids, image.axis_codes, image.spacing_zyx, [img_path.name, lab_path.name])

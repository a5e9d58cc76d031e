r"""CMR: MS-CMRSeg 2019 bSSFP (C0) cardiac MRI, 35 labelled patients; NIfTI preparation and the `cmr` benchmark.

Source: the Multi-sequence Cardiac MR Segmentation challenge 2019 (zmiclab.github.io/zxh/0/mscmrseg19; cite Zhuang,
TPAMI 2019), folder `C0LET2_nii45_for_challenge19` of its release: the bSSFP ("C0") short-axis volumes
`c0t2lge/patient<N>_C0.nii.gz` (patients 1-45, beside the T2 and LGE volumes, which are not used) and the manual
labels `c0gt/patient<N>_C0_manual.nii.gz` of the 35 training patients (label codes 200 left ventricular
myocardium, 500 left ventricular blood pool, 600 right ventricle). Classes, in Q-Net's / ADNet's order
(dataset_specifics: 1 LV-MYO, 2 LV-BP, 3 RV): left ventricular myocardium (200 -> id 1), left ventricular blood
pool (500 -> 2), right ventricle (600 -> 3). The ten C0 labels released later (`C0LET2_gt_for_challenge19/
C0_manual_10`) are not read, so the set is the 35 volumes the few-shot papers use.

`scripts/prepare_cmr.py` (`prepare()`)
  1. pairs each `patient<N>_C0_manual` label with `patient<N>_C0` (.nii.gz or .nii), reads both with nibabel,
     slices first in the stored voxel order ([k, j, i], the array SimpleITK gives: k is the short-axis slice
     stack). The stacks are oblique, so they are not reoriented to world axes (that could turn the slice axis
     into a row or column axis); the stored axis codes are recorded in the manifest;
  2. maps 0/200/500/600 to 0/1/2/3; any other value (or a non-integer one) is an error naming the file, as is a
     label of another size than its image or stored in a mirrored orientation;
  3. normalises intensities as CHAOS: clips above the volume's 99.5th percentile and rescales to [0, 1];
  4. no resampling, no cropping (in-plane sizes differ between patients; every slice is resized to --img-size
     for the network, and the 3D Dice is computed on this grid).
ADNet and Q-Net state that their CMR preprocessing follows SSL-ALPNet's abdominal MRI recipe (99.5th-percentile
clip, in-plane resampling and a 256 x 256 crop), but SSL-ALPNet's repository has no cardiac notebook, so the exact
spacing and crop are not verified here: numbers are close to, not identical with, theirs (as for CHAOS).
The cache (`<datapath>/C0LET2_nii45_for_challenge19/prepared_C0/` beside the raw folders, or --out with --cmr-cache)
holds image_<N>.npy, label_<N>.npy and manifest.json. Protocols: 2D episodes (class slices, supports from other
patients) and the volumetric protocol (engine/volumetric.py; 35 volumes -> Q-Net's CMR folds of 8).
"""
import re
from pathlib import Path

import numpy as np

from data.checks import DataReport
from data.nifti import RawVolume, nibabel, nifti_stem, numbered, read_pair
from data.volumes import MR_CLIP_PERCENTILE, PreparedVolumes, percentile_normalise, pid_order, prepare_cache

CLASSES = ['left ventricular myocardium', 'left ventricular blood pool', 'right ventricle']
LABEL_CODES = (200, 500, 600)           # the challenge's code of CLASSES[c] (class id c + 1)
INVALID = 255
CODE_LUT = np.full(max(LABEL_CODES) + 1, INVALID, np.uint8)
CODE_LUT[0] = 0
CODE_LUT[list(LABEL_CODES)] = np.arange(1, len(CLASSES) + 1)
CLIP_PERCENTILE = MR_CLIP_PERCENTILE
PREP_FORMAT = 'cdtg-cmr-mscmrseg-c0'
PREP_VERSION = 1
RELEASE = 'C0LET2_nii45_for_challenge19'
RAW_ROOTS = (RELEASE, f'MS-CMRSeg2019/{RELEASE}')
IMAGE_DIR, LABEL_DIR = 'c0t2lge', 'c0gt'
CACHE_NAME = 'prepared_C0'
RAW_LAYOUT = (f'  {RELEASE}/   (as the MS-CMRSeg 2019 release unpacks; MS-CMRSeg2019/{RELEASE}/ or that folder itself '
              'as --datapath also work)\n'
              f'    {IMAGE_DIR}/patient1_C0.nii.gz ... patient45_C0.nii.gz   (bSSFP; the _T2 / _LGE volumes beside '
              'them are not used)\n'
              f'    {LABEL_DIR}/patient1_C0_manual.nii.gz ... patient35_C0_manual.nii.gz   (35 labelled patients; '
              '200 LV myocardium, 500 LV blood pool, 600 RV)\n'
              '  (or one folder holding both patient<N>_C0.nii.gz and patient<N>_C0_manual.nii.gz; .nii works too)')
_IMAGE = re.compile(r'patient(\d+)_C0$', re.IGNORECASE)
_LABEL = re.compile(r'patient(\d+)_C0_manual$', re.IGNORECASE)


def _has_labels(folder: Path) -> bool:
    return folder.is_dir() and any(_LABEL.match(nifti_stem(p) or '') for p in folder.iterdir())


def find_raw_root(datapath: Path) -> Path | None:
    r"""The folder holding c0t2lge/ and c0gt/ (or both kinds of files), or None."""
    for root in [datapath / r for r in RAW_ROOTS] + [datapath]:
        if (root / LABEL_DIR).is_dir() or _has_labels(root):
            return root
    return None


def raw_folders(raw_root: Path) -> tuple[Path, Path]:
    r"""(folder of the C0 images, folder of their manual labels)."""
    if (raw_root / LABEL_DIR).is_dir():
        return raw_root / IMAGE_DIR, raw_root / LABEL_DIR
    return raw_root, raw_root


def load_volume(pid: str, img_path: Path, lab_path: Path, report: DataReport) -> RawVolume | None:
    r"""Read one image/label pair; problems go to `report` (key = patient). None if unusable."""
    refused = 'label values other than 0, 200 (LV myocardium), 500 (LV blood pool), 600 (RV)'
    return read_pair(pid, img_path, lab_path, report, (CODE_LUT, INVALID, refused))


def prepare(datapath: Path | str, out: Path | str | None = None, skip_bad: bool = False,
            overwrite: bool = False) -> Path:
    r"""Build the prepared cache from the raw NIfTI layout; returns the cache folder."""
    return prepare_cache(CMR, datapath, out, skip_bad=skip_bad, overwrite=overwrite)


# --- the benchmark ------------------------------------------------------------------------------------------------
class CMR(PreparedVolumes):
    r"""MS-CMRSeg bSSFP cardiac structures from the prepared cache; 2D episodes and the volumetric accessors."""
    name = 'cmr'
    domain = 'target'
    splits = ('test',)
    options = {'cmr_cache': 'prepared cache folder (default <datapath>/C0LET2_nii45_for_challenge19/prepared_C0, '
                            'written by scripts/prepare_cmr.py)'}
    protocols = ('2d', 'volumetric')
    layout = (f'{RAW_LAYOUT}\n  {RELEASE}/{CACHE_NAME}/manifest.json, image_<N>.npy, label_<N>.npy   (written by '
              '`python scripts/prepare_cmr.py --datapath DIR`)')
    volume_classes = tuple(CLASSES)
    title, raw_title, raw_format = 'CMR', 'MS-CMRSeg C0', 'NIfTI'
    raw_roots, raw_also, raw_layout = RAW_ROOTS, f'{RAW_ROOTS[1]}/, {IMAGE_DIR}/ + {LABEL_DIR}/', RAW_LAYOUT
    cache_subdir, cache_option, prepare_script = f'{RELEASE}/{CACHE_NAME}', 'cmr_cache', 'scripts/prepare_cmr.py'
    prep_format, prep_version = PREP_FORMAT, PREP_VERSION
    preprocessing = (f'stored slice order; intensities clipped above the {CLIP_PERCENTILE}th percentile per volume '
                     'and rescaled to [0, 1]; no resampling, no cropping')

    def configure(self, cmr_cache: str | None = None) -> None:
        super().configure(cmr_cache=cmr_cache)

    @classmethod
    def default_cache_dir(cls, datapath: Path | str) -> Path:
        r"""Beside the raw folders (<root>/prepared_C0), or <datapath>/C0LET2_nii45_for_challenge19/prepared_C0."""
        raw = find_raw_root(Path(datapath))
        return (raw if raw is not None else Path(datapath) / RELEASE) / CACHE_NAME

    @classmethod
    def find_raw_root(cls, datapath: Path) -> Path | None:
        return find_raw_root(datapath)

    @classmethod
    def iter_raw(cls, raw_root: Path, report: DataReport):
        nibabel()                                   # a missing nibabel stops here, with how to install it
        img_dir, lab_dir = raw_folders(raw_root)
        if not img_dir.is_dir():
            report.add('missing', img_dir, f'folder does not exist (the C0 images beside {lab_dir.name}/)')
            return
        images, labels = numbered(img_dir, _IMAGE, plain=True), numbered(lab_dir, _LABEL, plain=True)
        if not labels:
            report.add('missing', lab_dir / 'patient1_C0_manual.nii.gz', 'no patient<N>_C0_manual.nii.gz label')
            return
        unlabelled = sorted(set(images) - set(labels), key=pid_order)
        if unlabelled:
            report.notes.append(f'C0 volumes without a manual label, not used: patients {", ".join(unlabelled)}')
        for pid in sorted(labels, key=pid_order):
            if pid not in images:
                report.add('mask_without_image', labels[pid], f'image {img_dir / f"patient{pid}_C0.nii.gz"} does '
                                                              'not exist', pid)
                continue
            vol = load_volume(pid, images[pid], labels[pid], report)
            if vol is not None:
                yield vol

    @classmethod
    def prepare_volume(cls, vol: RawVolume) -> tuple[np.ndarray, np.ndarray, dict]:
        image, lo, clip = percentile_normalise(vol.image, CLIP_PERCENTILE)
        return image, vol.label, {'sources': vol.sources, 'stored_axes': ''.join(vol.axis_codes),
                                  'spacing_zyx_mm': vol.spacing, 'intensity_min': lo, 'clip_value': clip}

    @classmethod
    def manifest_fields(cls) -> dict:
        return {'label_codes': {name: code for name, code in zip(CLASSES, LABEL_CODES)}}

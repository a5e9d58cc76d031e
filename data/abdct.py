r"""ABD-CT: the Synapse multi-organ CT set (30 labelled abdominal volumes); NIfTI preparation, the `abd-ct` benchmark.

Source: "Multi-Atlas Labeling Beyond the Cranial Vault" (MICCAI 2015 challenge, Synapse syn3193805; cite Landman et
al. 2015), the 30 training volumes of `RawData.zip`: `Synapse/RawData/Training/img/img0001.nii.gz` with
`.../label/label0001.nii.gz` (ids 0001-0040 with gaps). Label codes of the challenge: 1 spleen, 2 right kidney,
3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 aorta, 9 inferior vena cava, 10 portal and splenic
veins, 11 pancreas, 12 right adrenal gland, 13 left adrenal gland. The few-shot classes of SSL-ALPNet / ADNet /
Q-Net are the four organs, in SSL-ALPNet's label order: spleen (code 1 -> id 1), right kidney (2 -> 2), left
kidney (3 -> 3), liver (6 -> 4); the other organs are background.

`scripts/prepare_abdct.py` (`prepare()`) reproduces SSL-ALPNet's preprocessing (cheng-01037/Self-supervised-
Fewshot-Medical-Image-Segmentation, data/SABS/intensity_normalization.ipynb then resampling_and_roi.ipynb):
  1. reads each volume with nibabel, slices first in the stored voxel order ([k, j, i], the array SimpleITK gives
     them); a label code outside 0-13, a non-integer label value or a label of another size is an error naming
     the file;
  2. intensity window: clip to [-125, 275] HU, then (x - min) / (max - min) of the clipped volume (their
     notebook's min-max, which is (x + 125) / 400 whenever the volume reaches both ends of the window, as every
     abdominal CT does), stored in [0, 1] (theirs: x 255);
  3. ROI: cuts BD_BIAS = 32 pixels off every in-plane border (512 -> 448);
  4. resamples in-plane only, by SPA_FAC = 448 / 256 = 1.75, on SimpleITK's grid: output pixel i samples the
     cropped image at 1.75 i (corner-aligned, not the centre-aligned grid of scipy.ndimage.zoom), bilinearly
     for the image; labels as their `resample_lb_by_res`: each organ's indicator is resampled bilinearly and
     a voxel takes the organ whose interpolated indicator exceeds 0.5 (indicators sum to 1, so at most one does);
     slices are not resampled;
  5. turns the volume to one orientation: columns run to the patient's left, rows to posterior, slices to
     superior (radiological display; the stored order of LPS-stored files, i.e. no change for them). Volumes
     stored otherwise are flipped after resampling, so their sampled voxels are still SSL-ALPNet's, mirrored.
     A volume whose stored axes are not axial (slice axis not inferior-superior) is an error naming the file.
Differences from SSL-ALPNet, stated: SimpleITK's size rule int(n + 1) gives their volumes 257 x 257 pixels and one
more slice, all outside the input (zero after normalisation, label background); their loader crops the slices to
256 x 256 again (`img[:256, :256]`), and the extra slice holds no organ, so it is never evaluated: we write
256 x 256 x D directly. Their values are float64 (ours float32, |difference| < 1e-6). Their loader then
z-scores with the CT statistics of the training fold; ours, like every target here, shows round(255 x value)
replicated to RGB with ImageNet normalisation. For an in-plane size other than 512 (none in this set) the border
is 32/512 of it and the result is still 256 x 256; when that means upsampling, samples past the last pixel repeat
it (SimpleITK would give 0).
The cache (`<datapath>/Synapse/prepared_abdct/`, or --out with --abd-ct-cache) holds image_<id>.npy (float32
[D,256,256] in [0, 1]), label_<id>.npy (uint8 organ ids 0-4) and manifest.json. Protocols: 2D episodes (organ
slices, supports from other volumes) and the volumetric protocol (engine/volumetric.py; 30 volumes -> Q-Net's
SABS folds of 7 volumes).
"""
import re
from pathlib import Path

import numpy as np

from data.checks import DataReport
from data.nifti import RawVolume, nibabel, numbered, read_pair
from data.volumes import PreparedVolumes, pid_order, prepare_cache

ORGANS = ['spleen', 'right kidney', 'left kidney', 'liver']
#: The challenge's label codes (code = position); the few-shot organs are codes 1, 2, 3 and 6.
CHALLENGE_LABELS = ('background', 'spleen', 'right kidney', 'left kidney', 'gallbladder', 'esophagus', 'liver',
                    'stomach', 'aorta', 'inferior vena cava', 'portal and splenic veins', 'pancreas',
                    'right adrenal gland', 'left adrenal gland')
ORGAN_CODES = (1, 2, 3, 6)          # challenge code of ORGANS[c] (organ id c + 1)
CODE_LUT = np.zeros(len(CHALLENGE_LABELS), np.uint8)
CODE_LUT[list(ORGAN_CODES)] = np.arange(1, len(ORGANS) + 1)
HU_WINDOW = (-125.0, 275.0)
BORDER_FRACTION = 32 / 512          # SSL-ALPNet's BD_BIAS for its 512 x 512 slices
OUT_SIZE = 256
TARGET_AXES = ('L', 'P', 'S')       # columns, rows, slices: the NIfTI (i, j, k) codes of an LPS-stored volume
PREP_FORMAT = 'cdtg-abdct-synapse'
PREP_VERSION = 1
CACHE_SUBDIR = 'Synapse/prepared_abdct'
RAW_ROOTS = ('Synapse/RawData/Training', 'RawData/Training', 'Abdomen/RawData/Training', 'Training')
RAW_LAYOUT = ('  Synapse/RawData/Training/   (as RawData.zip of Synapse syn3193805 unpacks under DATA/Synapse; '
              'RawData/Training/ or Training/ directly under --datapath also work)\n'
              '    img/img0001.nii.gz img0002.nii.gz ... img0040.nii.gz   (30 CT volumes, ids with gaps)\n'
              '    label/label0001.nii.gz ...   (same ids; codes 0-13, 1 spleen, 2 right kidney, 3 left kidney, '
              '6 liver)')
_IMG = re.compile(r'img(\d+)$', re.IGNORECASE)
_LABEL = re.compile(r'label(\d+)$', re.IGNORECASE)


def find_raw_root(datapath: Path) -> Path | None:
    r"""The folder holding img/ and label/, or None."""
    for rel in RAW_ROOTS:
        if (datapath / rel / 'img').is_dir():
            return datapath / rel
    if (datapath / 'img').is_dir() and (datapath / 'label').is_dir():
        return datapath                     # --datapath points at RawData/Training itself
    return None


# --- preparation steps ----------------------------------------------------------------------------------------------
def window(hu: np.ndarray, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]) -> tuple[np.ndarray, float, float]:
    r"""SSL-ALPNet's CT window: clip to [low, high], then min-max of the clipped volume -> float32 [0, 1].
    Returns (volume, min, max) of the clipped volume."""
    x = np.clip(hu.astype(np.float32), low, high)
    lo, hi = float(x.min()), float(x.max())
    out = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return out.astype(np.float32), lo, hi


def roi_grid(n: int, out: int = OUT_SIZE) -> tuple[int, float, np.ndarray]:
    r"""(border, scale, sample coordinates) along one in-plane axis of n pixels: the border cut off each side
    (round(n 32 / 512): 32 for 512), the scale (n - 2 border) / out (1.75 for 512) and the coordinates in the cropped
    axis that the `out` output pixels sample, scale x i (SimpleITK's corner-aligned grid), clamped to the last
    pixel (reached only when upsampling)."""
    border = int(round(n * BORDER_FRACTION))
    m = n - 2 * border
    if m < 2:
        raise ValueError(f'an in-plane size of {n} pixels leaves {m} after the ROI border of {border}')
    scale = m / out
    return border, scale, np.minimum(scale * np.arange(out), m - 1)


def lerp(a: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    r"""Linear interpolation of `a` along `axis` at the (non-negative, at most last index) `coords`."""
    n = a.shape[axis]
    i0 = np.clip(np.floor(coords).astype(np.intp), 0, max(n - 2, 0))
    w = (coords - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    lo, hi = np.take(a, i0, axis=axis), np.take(a, np.minimum(i0 + 1, n - 1), axis=axis)
    return lo * (1 - w) + hi * w


def roi_resample(image: np.ndarray, label: np.ndarray, n_classes: int = len(ORGANS)
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    r"""Steps 3-4 on [D,H,W] volumes: ROI border cut and in-plane resampling to OUT_SIZE x OUT_SIZE (image
    bilinear; each class's indicator bilinear, > 0.5). Returns (image, label, {border, scale} per axis)."""
    (bh, sh, ch), (bw, sw, cw) = roi_grid(image.shape[1]), roi_grid(image.shape[2])
    crop = (slice(None), slice(bh, image.shape[1] - bh), slice(bw, image.shape[2] - bw))
    out = lerp(lerp(image[crop], ch, 1), cw, 2).astype(np.float32)
    lab = np.zeros(out.shape, np.uint8)
    for c in range(1, n_classes + 1):
        member = (label[crop] == c).astype(np.float32)
        if member.any():
            lab[lerp(lerp(member, ch, 1), cw, 2) > 0.5] = c
    return out, lab, {'roi_border_px': [bh, bw], 'scale': [sh, sw]}


def orientation_flips(codes: tuple[str, str, str]) -> tuple[int, ...]:
    r"""The [D,H,W] axes to flip so that a volume stored with NIfTI axis codes `codes` (i, j, k) has columns
    running to the patient's left, rows to posterior and slices to superior."""
    per_axis = {2: codes[0], 1: codes[1], 0: codes[2]}             # [D,H,W] axis -> code of its NIfTI axis
    target = {2: TARGET_AXES[0], 1: TARGET_AXES[1], 0: TARGET_AXES[2]}
    return tuple(a for a in (0, 1, 2) if per_axis[a] != target[a])


def orientation_problem(codes: tuple[str, str, str]) -> str | None:
    r"""Why a volume stored with axis codes `codes` cannot be brought to the axial orientation (None: it can)."""
    if codes[0] in 'LR' and codes[1] in 'AP' and codes[2] in 'SI':
        return None
    return (f'stored axes {"".join(codes)} (NIfTI i, j, k): expected an axial volume with columns left-right, rows '
            'anterior-posterior and slices inferior-superior (e.g. LPS or RAS)')


def load_volume(pid: str, img_path: Path, lab_path: Path, report: DataReport) -> RawVolume | None:
    r"""Read one image/label pair; problems go to `report` (key = id). None if unusable."""
    vol = read_pair(pid, img_path, lab_path, report, (CODE_LUT, 255, 'label values outside the challenge codes 0-13'))
    if vol is None:
        return None
    try:
        for n in vol.image.shape[1:]:
            roi_grid(n)
    except ValueError as err:
        report.add('other', img_path, str(err), pid)
        return None
    problem = orientation_problem(vol.axis_codes)
    if problem:
        report.add('other', img_path, problem, pid)
        return None
    return vol


def prepare(datapath: Path | str, out: Path | str | None = None, skip_bad: bool = False,
            overwrite: bool = False) -> Path:
    r"""Build the prepared cache from the raw NIfTI layout; returns the cache folder."""
    return prepare_cache(AbdCT, datapath, out, skip_bad=skip_bad, overwrite=overwrite)


# --- the benchmark ------------------------------------------------------------------------------------------------
class AbdCT(PreparedVolumes):
    r"""Synapse abdominal CT organs from the prepared cache; 2D episodes, and the volumetric protocol's accessors."""
    name = 'abd-ct'
    domain = 'target'
    splits = ('test',)
    options = {'abd_ct_cache': 'prepared cache folder (default <datapath>/Synapse/prepared_abdct, written by '
                               'scripts/prepare_abdct.py)'}
    protocols = ('2d', 'volumetric')
    layout = (f'{RAW_LAYOUT}\n  {CACHE_SUBDIR}/manifest.json, image_<id>.npy, label_<id>.npy   (written by '
              '`python scripts/prepare_abdct.py --datapath DIR`)')
    volume_classes = tuple(ORGANS)
    title, raw_title, raw_format = 'ABD-CT', 'Synapse CT', 'NIfTI'
    raw_roots, raw_also, raw_layout = RAW_ROOTS, ', '.join(f'{r}/' for r in RAW_ROOTS[1:]), RAW_LAYOUT
    cache_subdir, cache_option, prepare_script = CACHE_SUBDIR, 'abd_ct_cache', 'scripts/prepare_abdct.py'
    prep_format, prep_version = PREP_FORMAT, PREP_VERSION
    preprocessing = (f'SSL-ALPNet: window [{HU_WINDOW[0]:g}, {HU_WINDOW[1]:g}] HU then min-max to [0, 1]; ROI border '
                     f'32/512 cut; in-plane bilinear resampling to {OUT_SIZE}x{OUT_SIZE} on SimpleITK\'s grid '
                     '(labels: indicator > 0.5); slices not resampled; oriented L, P, S')

    def configure(self, abd_ct_cache: str | None = None) -> None:
        super().configure(abd_ct_cache=abd_ct_cache)

    @classmethod
    def find_raw_root(cls, datapath: Path) -> Path | None:
        return find_raw_root(datapath)

    @classmethod
    def iter_raw(cls, raw_root: Path, report: DataReport):
        nibabel()                                   # a missing nibabel stops here, with how to install it
        img_dir, lab_dir = raw_root / 'img', raw_root / 'label'
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                report.add('missing', d, 'folder does not exist')
                return
        images, labels = numbered(img_dir, _IMG), numbered(lab_dir, _LABEL)
        if not images:
            report.add('missing', img_dir / 'img0001.nii.gz', 'no img<id>.nii.gz volume')
            return
        for pid in sorted(set(labels) - set(images), key=pid_order):
            report.add('mask_without_image', labels[pid], f'no image {img_dir / f"img{pid}.nii.gz"}; not used',
                       hard=False)
        for pid in sorted(images, key=pid_order):
            if pid not in labels:
                report.add('image_without_mask', images[pid], f'label {lab_dir / f"label{pid}.nii.gz"} does not '
                                                              'exist', pid)
                continue
            vol = load_volume(pid, images[pid], labels[pid], report)
            if vol is not None:
                yield vol

    @classmethod
    def prepare_volume(cls, vol: RawVolume) -> tuple[np.ndarray, np.ndarray, dict]:
        image, lo, hi = window(vol.image)
        image, label, grid = roi_resample(image, vol.label)
        flips = orientation_flips(vol.axis_codes)
        if flips:
            image, label = np.flip(image, flips).copy(), np.flip(label, flips).copy()
        dz, dy, dx = vol.spacing
        return image, label, {'sources': vol.sources, 'raw_shape': list(vol.label.shape),
                              'stored_axes': ''.join(vol.axis_codes), 'flipped_axes': ['DHW'[a] for a in flips],
                              'window_min_max_hu': [lo, hi], **grid,
                              'spacing_zyx_mm': [dz, dy * grid['scale'][0], dx * grid['scale'][1]]}

    @classmethod
    def manifest_fields(cls) -> dict:
        return {'label_codes': {name: code for name, code in zip(ORGANS, ORGAN_CODES)},
                'challenge_labels': list(CHALLENGE_LABELS)}

r"""Tiny synthetic copies of the target benchmarks, written in their exact real layouts with their known pitfalls.

Every image is dark (40) with a bright (210) region exactly where its mask is foreground, and each file's region
is placed from its own index, so a test can check image/mask pairing by thresholding the loaded image. CHAOS is
written as real DICOM files with pydicom, stored out of order, with labels in the organ gray ranges.
"""
from pathlib import Path

import numpy as np
from PIL import Image

DARK, BRIGHT = 40, 210


def blob(h: int, w: int, index: int) -> np.ndarray:
    r"""A rectangle whose position and size depend on `index` (distinct for neighbouring indices)."""
    m = np.zeros((h, w), bool)
    y0, x0 = 2 + index % max(h // 3, 1), 2 + (3 * index) % max(w // 3, 1)
    m[y0:y0 + max(h // 3, 3), x0:x0 + max(w // 3, 3)] = True
    return m


def image_for(mask: np.ndarray, rgb: bool = True) -> np.ndarray:
    img = np.where(mask, BRIGHT, DARK).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2) if rgb else img


# --- ISIC ---------------------------------------------------------------------------------------------------------
ISIC_CLASSES = ['nevus'] * 6 + ['melanoma'] * 4 + ['seborrheic_keratosis'] * 3


def write_isic(datapath: Path, root: str = 'ISIC2018', csv: str | None = 'crlf', sorted_folders: dict | None = None,
               sk_spelling: str = 'seborrheic_keratosis') -> dict[str, str]:
    r"""ISIC Task 1 layout; returns id -> class ('seborrheic keratosis' normalised). `csv`: 'crlf' (with a BOM and
    CRLF, as shipped), 'lf', or None (no class file). `sorted_folders`: folder number per class name -> images go
    into Training_Input/<n>/ instead of the flat folder (PATNet's hand-sorted layout)."""
    base = datapath / root
    img_dir = base / 'ISIC2018_Task1-2_Training_Input'
    gt_dir = base / 'ISIC2018_Task1_Training_GroundTruth'
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    (img_dir / 'ATTRIBUTION.txt').write_text('not an image')
    (img_dir / 'LICENSE.txt').write_text('not an image')
    (gt_dir / 'LICENSE.txt').write_text('not a mask')
    classes = {}
    rows = ['ID,Class']
    for i, cls in enumerate(ISIC_CLASSES):
        ident = f'ISIC_{i * 7:07d}'
        h, w = 20 + (i % 3) * 4, 24 + (i % 2) * 6           # varied sizes
        m = blob(h, w, i)
        folder = img_dir / str(sorted_folders[cls]) if sorted_folders else img_dir
        folder.mkdir(exist_ok=True)
        Image.fromarray(image_for(m)).save(folder / f'{ident}.jpg', quality=95)
        Image.fromarray((m * 255).astype(np.uint8)).save(gt_dir / f'{ident}_segmentation.png')
        label = sk_spelling if cls == 'seborrheic_keratosis' else cls
        rows.append(f'{ident},{label}')
        classes[ident] = cls.replace('_', ' ')
    if csv:
        text = ('\r\n' if csv == 'crlf' else '\n').join(rows) + ('\r\n' if csv == 'crlf' else '\n')
        (base / 'class_id.csv').write_bytes((b'\xef\xbb\xbf' if csv == 'crlf' else b'') + text.encode())
    return classes


# --- Chest X-ray --------------------------------------------------------------------------------------------------
def write_lung(datapath: Path, root: str = 'Lung Segmentation', shenzhen: int = 5, montgomery: int = 3) -> dict:
    r"""Kaggle chest-xray-masks-and-labels layout: `shenzhen` Shenzhen images (2 of them without masks, masks
    `*_mask.png`) and `montgomery` Montgomery images (masks with the image's own name); grayscale PNGs of varied
    sizes; one 1-bit and one RGB mask."""
    base = datapath / root
    for d in ('CXR_png', 'masks', 'test', 'ClinicalReadings'):
        (base / d).mkdir(parents=True)
    pairs, unmasked = {}, []
    names = ([f'CHNCXR_{i:04d}_{i % 2}' for i in range(1, shenzhen + 1)]
             + [f'MCUCXR_{i:04d}_{i % 2}' for i in range(1, montgomery + 1)])
    for i, name in enumerate(names):
        h, w = 26 + 2 * i, 22 + i
        m = blob(h, w, i)
        Image.fromarray(image_for(m, rgb=False)).save(base / 'CXR_png' / f'{name}.png')
        (base / 'ClinicalReadings' / f'{name}.txt').write_text('reading')
        if name in ('CHNCXR_0002_0', 'CHNCXR_0004_0'):
            unmasked.append(name)
            continue
        mask_name = f'{name}_mask.png' if name.startswith('CHNCXR') else f'{name}.png'
        mask = Image.fromarray((m * 255).astype(np.uint8))
        if name == 'MCUCXR_0002_0':
            mask = Image.fromarray(m)                      # a 1-bit PNG: must read as 0/255, not 0/1
        elif name == 'CHNCXR_0003_1':
            mask = mask.convert('RGB')                     # a 3-channel mask
        mask.save(base / 'masks' / mask_name)
        pairs[name] = mask_name
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(base / 'test' / 'CHNCXR_0002_0.png')
    return {'pairs': pairs, 'unmasked': unmasked}


# --- WBC ----------------------------------------------------------------------------------------------------------
WBC_SIZES_1 = [(12, 12), (12, 12), (9, 9), (12, 11), (10, 12)]      # (h, w): square and odd sizes
STRAY = {2: 0, 45: 0, 70: 128, 100: 128, 130: 128, 200: 255}        # raw value -> expected snapped code


def wbc_mask(h: int, w: int, index: int, cytoplasm: bool = True) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cy, cx = h // 2 + index % 2, w // 2
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.maximum(abs(yy - cy), abs(xx - cx))
    if cytoplasm:
        m[d <= 3] = 128
    m[d <= 1] = 255
    return m


def write_wbc(datapath: Path, root: str = 'WBC') -> dict:
    r"""`Dataset 1` (5 cells, odd sizes; cell 005 has no cytoplasm) and `Dataset 2` (3 cells, 14x14; mask 002 holds
    stray values). Returns the raw masks keyed 'ds1/001' ... and the expected class members."""
    masks, nucleus, cytoplasm = {}, [], []
    for subset, sizes in (('1', WBC_SIZES_1), ('2', [(14, 14)] * 3)):
        folder = datapath / root / f'Dataset {subset}'
        folder.mkdir(parents=True)
        for i, (h, w) in enumerate(sizes, 1):
            stem, key = f'{i:03d}', f'ds{subset}/{i:03d}'
            has_cyto = not (subset == '1' and i == 5)
            m = wbc_mask(h, w, i, has_cyto)
            if subset == '2' and i == 2:
                for j, value in enumerate(STRAY):             # stray pixels in the background corner row
                    m[0, j] = value
            img = np.stack([np.where(m == 255, 60, np.where(m == 128, 150, 220))] * 3, axis=2).astype(np.uint8)
            Image.fromarray(img).save(folder / f'{stem}.bmp')
            Image.fromarray(m).save(folder / f'{stem}.png')
            masks[key] = m
            nucleus.append(key)
            if has_cyto or (subset == '2' and i == 2):
                cytoplasm.append(key)
    (datapath / root / 'Class Labels of Dataset 1.csv').write_text('image ID,class label\n1,1\n')
    (datapath / root / 'Class Labels of Dataset 2.csv').write_text('image ID,class\n1,2\n')
    return {'masks': masks, 'nucleus': nucleus, 'cytoplasm': cytoplasm}


# --- FSS-1000 and Deepglobe ---------------------------------------------------------------------------------------
def write_fss(datapath: Path, n_classes: int = 10, per_class: int = 3) -> list[str]:
    names = [f'class_{i:02d}' for i in range(n_classes)]
    for c, name in enumerate(names):
        folder = datapath / 'FSS-1000' / name
        folder.mkdir(parents=True)
        for k in range(1, per_class + 1):
            m = blob(16, 16, c + k)
            Image.fromarray(image_for(m)).save(folder / f'{k}.jpg', quality=95)
            Image.fromarray((m * 255).astype(np.uint8)).save(folder / f'{k}.png')
    return names


def write_deepglobe(datapath: Path, per_class: int = 2) -> None:
    for c in range(1, 7):
        origin, gt = (datapath / 'Deepglobe' / str(c) / 'test' / d for d in ('origin', 'groundtruth'))
        origin.mkdir(parents=True)
        gt.mkdir(parents=True)
        for k in range(per_class):
            m = blob(16, 16, c * 3 + k)
            Image.fromarray(image_for(m)).save(origin / f'{c}{k}_sat_00.jpg', quality=95)
            Image.fromarray(np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2)).save(gt / f'{c}{k}_sat_00.png')


# --- CHAOS (real DICOM) -------------------------------------------------------------------------------------------
ORGAN_GRAYS = {1: (58, 63, 70), 2: (112, 126, 135), 3: (176, 189, 199), 4: (241, 252, 255)}   # in-range variants


def chaos_labels(n_slices: int, size: int, variant: int) -> np.ndarray:
    r"""Organ ids [D,H,W] in true slice order: liver in the upper slices, the kidneys low, spleen in the middle."""
    lab = np.zeros((n_slices, size, size), np.uint8)
    q = size // 4
    for z in range(n_slices):
        if z >= 1:
            lab[z, 1:q + 1, 1:q + 1] = 1                                  # liver
        if z <= n_slices - 2:
            lab[z, size - q - 1:size - 1, 1:q + 1] = 2                    # right kidney
        if 1 <= z <= n_slices - 2:
            lab[z, size - q - 1:size - 1, size - q - 1:size - 1] = 3      # left kidney
        if z == n_slices // 2 or (variant % 2 == 0 and z == n_slices // 2 + 1):
            lab[z, 1:q + 1, size - q - 1:size - 1] = 4                    # spleen
    return lab


def write_dicom(path: Path, pixels: np.ndarray, position, orientation, instance: int | None, pid: str,
                series_uid: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = 'MR'
    ds.PatientID = f'CHAOS-{pid}'
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = 'T2SPIR'
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [1.5, 1.5]
    ds.SliceThickness = 7.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype('<u2').tobytes()
    ds.save_as(path, enforce_file_format=True)


def chaos_intensity(z: int, lab: np.ndarray, pid_index: int) -> np.ndarray:
    r"""12-bit slice whose level encodes its true index z (200 + (100 + 7 p) z for the p-th patient, so normalised
    slices differ between patients), organs 300 brighter, one hot outlier voxel."""
    img = np.full(lab.shape, 200 + (100 + 7 * pid_index) * z, np.int32) + 300 * (lab > 0)
    h, w = lab.shape
    img[h - 1, pid_index % w] += 150                     # patient markers in organ-free rows: slices of different
    img[3, (pid_index // w) % w] += 150                  # patients never coincide after normalisation
    img[0, 0] = 4000 if z == 0 else img[0, 0]            # the percentile clip must remove it
    return img.astype(np.uint16)


def write_chaos(datapath: Path, pids=(1, 2, 3, 5), n_slices: int = 5, size: int = 16, orders: dict | None = None
                ) -> dict:
    r"""Raw `CHAOS/Train_Sets/MR/<pid>/T2SPIR/{DICOM_anon,Ground}` with slices stored out of order.

    File k holds the slice at true position perm[k] (file names no longer follow the anatomy); the Ground PNG with
    the same stem holds that slice's labels in the organ gray ranges. Patient orientation varies: axial (normal +z),
    coronal (normal +y; sorting by the raw z coordinate would be wrong), and, with `orders[pid] = 'instance'`, no
    position tags (InstanceNumber fallback). With positions, InstanceNumber follows the file order (wrong on
    purpose), so only a position sort restores the anatomy. Returns per pid the true labels [D,H,W] and the permutation.
    """
    from pydicom.uid import generate_uid

    truth = {}
    orders = orders or {}
    for p_index, pid in enumerate(pids):
        pdir = datapath / 'CHAOS' / 'Train_Sets' / 'MR' / str(pid)
        dcm_dir, gnd_dir = pdir / 'T2SPIR' / 'DICOM_anon', pdir / 'T2SPIR' / 'Ground'
        dcm_dir.mkdir(parents=True)
        gnd_dir.mkdir(parents=True)
        (pdir / 'T1DUAL' / 'DICOM_anon').mkdir(parents=True)       # unused modality, must be ignored
        lab = chaos_labels(n_slices, size, p_index)
        perm = np.random.default_rng(pid).permutation(n_slices)
        if (perm == np.arange(n_slices)).all():
            perm = perm[::-1].copy()
        series = generate_uid()
        coronal = p_index % 2 == 1
        orientation = [1, 0, 0, 0, 0, -1] if coronal else [1, 0, 0, 0, 1, 0]
        for k, z in enumerate(perm):
            stem = f'IMG-0002-{k + 1:05d}'
            # Position along the normal grows with z; the other coordinates stay fixed. Axial: z coordinate
            # decreases with file index for some slices; coronal: y grows with z while the z coordinate is constant.
            position = [-150.0, -120.0 + 7.7 * z, 40.0] if coronal else [-150.0, -120.0, -60.0 + 7.7 * z]
            mode = orders.get(pid, 'position')
            write_dicom(dcm_dir / f'{stem}.dcm', chaos_intensity(z, lab[z], p_index),
                        None if mode == 'instance' else position, orientation,
                        int(z) + 1 if mode == 'instance' else k + 1, str(pid), series)
            gray = np.zeros((size, size), np.uint8)
            for organ, values in ORGAN_GRAYS.items():
                gray[lab[z] == organ] = values[(k + organ) % len(values)]
            Image.fromarray(gray).save(gnd_dir / f'{stem}.png')
        truth[str(pid)] = {'label': lab, 'perm': perm}
    return truth


# --- a tiny checkpoint ------------------------------------------------------------------------------------------
def tiny_checkpoint(path: Path, img_size: int = 64) -> Path:
    r"""An HSNet checkpoint with random weights (no training, no download) that test.py can load."""
    import warnings

    import torch

    from common.checkpoint import save_checkpoint
    from model import build_method

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = build_method('hsnet', 'resnet50', 'none')
    config = {'method': 'hsnet', 'backbone': 'resnet50', 'img_size': img_size, 'benchmark': 'synthetic'}
    save_checkpoint({'model': model.state_dict(), 'config': config, 'method': 'hsnet', 'backbone': 'resnet50',
                     'epoch': 0}, path)
    return path

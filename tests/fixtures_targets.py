r"""Tiny synthetic copies of the target benchmarks, written in their exact real layouts with their known pitfalls.

Every image is dark (40) with a bright (210) region exactly where its mask is foreground, and each file's region
is placed from its own index, so a test can check image/mask pairing by thresholding the loaded image. CHAOS is
written as real DICOM files with pydicom, stored out of order, with labels in the organ gray ranges; ABD-CT and CMR
as NIfTI volumes with nibabel, in several stored orientations, with label codes the benchmarks must map or refuse.
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


# --- Kvasir-SEG ---------------------------------------------------------------------------------------------------
KVASIR_SIZES = [(36, 52), (44, 40), (36, 52), (30, 46), (44, 40), (52, 60)]     # (h, w): four different sizes


def kvasir_id(index: int) -> str:
    return f'cju{index:02d}kq{index * 7:04d}l0dewei2'             # the style of the real ids


def kvasir_polyp(h: int, w: int, index: int) -> np.ndarray:
    r"""An elliptic polyp whose centre and radii depend on `index` (bool [h, w])."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h / 2 + (index % 3 - 1) * 3, w / 2 + (index % 2) * 4 - 2
    ry, rx = h / 4 + index % 3, w / 4 + index % 2
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def write_kvasir(datapath: Path, root: str = 'Kvasir-SEG', n: int = len(KVASIR_SIZES)) -> dict[str, np.ndarray]:
    r"""The kvasir-seg.zip layout: `images/<id>.jpg` (RGB JPEGs, dark with the polyp bright) and `masks/<id>.jpg` of
    the same names and sizes: 0/255 drawings saved as JPEG at quality 75, so their decoded values carry compression
    noise (e.g. 1-10 and 245-254, a few mid values on the edge), alternately as RGB and L; plus kavsir_bboxes.json.
    Returns id -> the drawn polyp (bool [h, w]), the truth a binarised mask must equal."""
    base = datapath / root
    (base / 'images').mkdir(parents=True)
    (base / 'masks').mkdir(parents=True)
    (base / 'kavsir_bboxes.json').write_text('{}')
    truth = {}
    for i in range(n):
        h, w = KVASIR_SIZES[i % len(KVASIR_SIZES)]
        ident, m = kvasir_id(i), kvasir_polyp(h, w, i)
        Image.fromarray(image_for(m)).save(base / 'images' / f'{ident}.jpg', quality=95)
        mask = Image.fromarray((m * 255).astype(np.uint8))
        (mask.convert('RGB') if i % 2 == 0 else mask).save(base / 'masks' / f'{ident}.jpg', quality=75)
        truth[ident] = m
    return truth


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


# --- ABD-CT (Synapse NIfTI) -----------------------------------------------------------------------------------------
#: Challenge codes drawn by `abdct_codes`: the four few-shot organs and three others that must become background.
ABDCT_ORGAN_CODES = {'liver': 6, 'spleen': 1, 'right kidney': 2, 'left kidney': 3}
ABDCT_HU = {0: -60, 1: 120, 2: 230, 3: 210, 6: 70, 7: 10, 8: 180, 11: 40}      # code -> HU level
#: How each fixture volume is stored: NIfTI axis codes of (i, j, k); RAS flips columns and rows, LPI the slices.
ABDCT_AFFINES = {'LPS': (-0.7, -0.7, 3.0), 'RAS': (0.7, 0.7, 3.0), 'LPI': (-0.7, -0.7, -3.0)}


def abdct_codes(n_slices: int, size: int, variant: int) -> np.ndarray:
    r"""Challenge label codes [D,H,W] in display orientation (slices inferior -> superior, rows anterior ->
    posterior, columns patient right -> left): liver on the image's left (the patient's right) in the upper slices,
    spleen on the image's right in the middle, the kidneys posterior and low, plus stomach (7), aorta (8) and
    pancreas (11), which the benchmark maps to background."""
    lab = np.zeros((n_slices, size, size), np.uint8)
    q = size // 4
    for z in range(n_slices):
        if z >= 1:
            lab[z, 2:2 + q + 1, 1:1 + q + 1] = 6                                  # liver
        if 1 <= z <= n_slices - 2 or (variant % 2 == 0 and z == n_slices - 1):
            lab[z, 2:2 + q, size - q - 2:size - 2] = 1                            # spleen
        if z <= n_slices - 2:
            lab[z, size - q - 2:size - 1, 2:2 + q] = 2                            # right kidney
        if z <= n_slices - 3 + variant % 2:
            lab[z, size - q - 2:size - 1, size - q - 2:size - 1] = 3              # left kidney
        lab[z, size // 2, size // 2 - 1:size // 2 + 1] = 8                        # aorta
        lab[z, 1, size // 2 - 2:size // 2 + 2] = 7                                # stomach
        if z == n_slices // 2:
            lab[z, size // 2 + 1, 1:4] = 11                                       # pancreas
    return lab


def abdct_hu(codes: np.ndarray, bone: bool = True) -> np.ndarray:
    r"""HU [D,H,W]: organ levels `ABDCT_HU`, background -60 + 15 z (so slice order is visible), air (-1000) in the
    first row and column, and, with `bone`, one voxel of 1200 HU per slice (the window clips both): the window's
    min-max is then exactly (x + 125) / 400. Without bone the volume's maximum (230) sets the scale."""
    hu = np.zeros(codes.shape, np.float64)
    for code, level in ABDCT_HU.items():
        hu[codes == code] = level
    hu += (15 * np.arange(codes.shape[0]))[:, None, None] * (codes == 0)
    hu[:, 0, :] = -1000
    hu[:, :, 0] = -1000
    if bone:
        hu[:, codes.shape[1] // 2 + 2, codes.shape[2] // 2] = 1200
    return hu


def to_stored(display: np.ndarray, codes: str) -> np.ndarray:
    r"""Display [D,H,W] (slices S, rows P, columns L) -> the NIfTI (i, j, k) array of a volume stored as `codes`."""
    flips = tuple(a for a, (code, want) in enumerate(zip(codes[::-1], 'SPL')) if code != want)
    return np.flip(display, flips).transpose(2, 1, 0)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def write_abdct(datapath: Path, pids=('0001', '0002', '0005', '0010'), n_slices: int = 5, size: int = 16,
                storage: dict | None = None, root: str = 'Synapse/RawData/Training') -> dict:
    r"""RawData.zip's `Training/img/img<id>.nii.gz` + `Training/label/label<id>.nii.gz` (ids with gaps). Volumes are
    stored as LPS, RAS, LPI, LPS by default (`storage[pid]` overrides); the third volume is written uncompressed
    (.nii), the last has no bone (its window min-max is not (x + 125) / 400), labels alternate uint8 / float32.
    Returns per id the display-orientation codes and HU, the storage and the stored arrays."""
    storage = storage or {}
    truth = {}
    for index, pid in enumerate(pids):
        codes = abdct_codes(n_slices, size, index)
        hu = abdct_hu(codes, bone=index != 3)
        kind = storage.get(pid, ('LPS', 'RAS', 'LPI', 'LPS')[index % 4])
        affine = np.diag([*ABDCT_AFFINES[kind], 1.0])
        suffix = '.nii' if index == 2 else '.nii.gz'
        stored_hu, stored_codes = to_stored(hu, kind).astype(np.int16), to_stored(codes, kind)
        write_nifti(datapath / root / 'img' / f'img{pid}{suffix}', stored_hu, affine)
        write_nifti(datapath / root / 'label' / f'label{pid}.nii.gz',
                    stored_codes.astype(np.float32 if index % 2 else np.uint8), affine)
        truth[pid] = {'codes': codes, 'hu': hu, 'storage': kind, 'stored_hu': stored_hu, 'stored_codes': stored_codes}
    return truth


# --- CMR (MS-CMRSeg 2019 C0 NIfTI) ----------------------------------------------------------------------------------
CMR_CODES = {'left ventricular myocardium': 200, 'left ventricular blood pool': 500, 'right ventricle': 600}


def cmr_codes(n_slices: int, size: int, variant: int) -> np.ndarray:
    r"""Label codes in stored [D,H,W] order: a blood pool (500) inside a myocardium ring (200), the RV (600) beside
    it; the last slice (apex) has no RV, the first (base) of every other patient no blood pool."""
    lab = np.zeros((n_slices, size, size), np.int16)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = size // 2 + variant % 2, size // 2 + 2
    d = np.maximum(abs(yy - cy), abs(xx - cx))
    for z in range(n_slices):
        lab[z][d <= 3] = 200
        if not (z == 0 and variant % 2):
            lab[z][d <= 1] = 500
        if z < n_slices - 1:
            lab[z][(abs(yy - cy) <= 2) & (xx >= cx - 7) & (xx <= cx - 5)] = 600
    return lab


def cmr_intensity(lab: np.ndarray, index: int) -> np.ndarray:
    r"""bSSFP-like levels: bright blood pool (900) and RV (800), dark myocardium (150), background 300 + (20 + index)
    z, and one hot voxel (6000) the 99.5th-percentile clip removes."""
    img = np.where(lab == 500, 900, np.where(lab == 600, 800, np.where(lab == 200, 150, 0))).astype(np.float64)
    img += (300 + (20 + index) * np.arange(lab.shape[0]))[:, None, None] * (lab == 0)
    img[0, 0, 0] = 6000
    return img


def write_cmr(datapath: Path, pids=(1, 2, 10, 12), n_slices: int = 5, size: int = 16, flat: bool = False,
              unlabelled=(40,)) -> dict:
    r"""The MS-CMRSeg release: `C0LET2_nii45_for_challenge19/c0t2lge/patient<N>_C0.nii.gz` (plus _T2 / _LGE
    volumes and C0 images of unlabelled patients, none of them used) and `c0gt/patient<N>_C0_manual.nii.gz`; with
    `flat`, images and labels in one folder. Stored oblique (a rotated affine): the benchmark keeps the stored
    order. Labels alternate uint16 / float32. Returns per patient the stored [D,H,W] codes and intensities."""
    base = datapath / 'C0LET2_nii45_for_challenge19'
    img_dir, lab_dir = (base, base) if flat else (base / 'c0t2lge', base / 'c0gt')
    theta = np.deg2rad(35)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.25, 1.25, 8.0])
    truth = {}
    for index, pid in enumerate(pids):
        lab = cmr_codes(n_slices, size, index)
        img = cmr_intensity(lab, index)
        write_nifti(img_dir / f'patient{pid}_C0.nii.gz', img.transpose(2, 1, 0).astype(np.int16), affine)
        write_nifti(img_dir / f'patient{pid}_T2.nii.gz', np.zeros((size, size, 3), np.int16), affine)
        write_nifti(img_dir / f'patient{pid}_LGE.nii.gz', np.zeros((size, size, 3), np.int16), affine)
        write_nifti(lab_dir / f'patient{pid}_C0_manual.nii.gz',
                    lab.transpose(2, 1, 0).astype(np.float32 if index % 2 else np.uint16), affine)
        truth[str(pid)] = {'codes': lab, 'image': img}
    for pid in unlabelled:
        write_nifti(img_dir / f'patient{pid}_C0.nii.gz', np.zeros((size, size, n_slices), np.int16), affine)
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
